//! The assigned ISO 3166-1 alpha-2 country codes, for validating query filters. Data only:
//! a sorted table and a lookup; it must not grow rules of its own (those are in
//! `validate`).
//!
//! Source: the ISO 3166 Maintenance Agency's list of officially assigned alpha-2 elements
//! (ISO Online Browsing Platform, <https://www.iso.org/obp/ui/#search/code/>), as shipped by
//! Debian's `iso-codes` 4.15.0 (`/usr/share/iso-codes/json/iso_3166-1.json`) and checked
//! against tzdata 2025b's `iso3166.tab`: the same 249 codes. Not included: user-assigned
//! codes (AA, QM-QZ, XA-XZ, ZZ), exceptionally reserved ones (EU, UK, UN, ...) and
//! withdrawn ones (AN, CS, ...). [`EXTRA`] lists the one exception this API accepts.

/// Every officially assigned alpha-2 code, sorted (binary-searched).
const ASSIGNED: [[u8; 2]; 249] = [
    *b"AD", *b"AE", *b"AF", *b"AG", *b"AI", *b"AL", *b"AM", *b"AO", *b"AQ", *b"AR", *b"AS", *b"AT",
    *b"AU", *b"AW", *b"AX", *b"AZ", *b"BA", *b"BB", *b"BD", *b"BE", *b"BF", *b"BG", *b"BH", *b"BI",
    *b"BJ", *b"BL", *b"BM", *b"BN", *b"BO", *b"BQ", *b"BR", *b"BS", *b"BT", *b"BV", *b"BW", *b"BY",
    *b"BZ", *b"CA", *b"CC", *b"CD", *b"CF", *b"CG", *b"CH", *b"CI", *b"CK", *b"CL", *b"CM", *b"CN",
    *b"CO", *b"CR", *b"CU", *b"CV", *b"CW", *b"CX", *b"CY", *b"CZ", *b"DE", *b"DJ", *b"DK", *b"DM",
    *b"DO", *b"DZ", *b"EC", *b"EE", *b"EG", *b"EH", *b"ER", *b"ES", *b"ET", *b"FI", *b"FJ", *b"FK",
    *b"FM", *b"FO", *b"FR", *b"GA", *b"GB", *b"GD", *b"GE", *b"GF", *b"GG", *b"GH", *b"GI", *b"GL",
    *b"GM", *b"GN", *b"GP", *b"GQ", *b"GR", *b"GS", *b"GT", *b"GU", *b"GW", *b"GY", *b"HK", *b"HM",
    *b"HN", *b"HR", *b"HT", *b"HU", *b"ID", *b"IE", *b"IL", *b"IM", *b"IN", *b"IO", *b"IQ", *b"IR",
    *b"IS", *b"IT", *b"JE", *b"JM", *b"JO", *b"JP", *b"KE", *b"KG", *b"KH", *b"KI", *b"KM", *b"KN",
    *b"KP", *b"KR", *b"KW", *b"KY", *b"KZ", *b"LA", *b"LB", *b"LC", *b"LI", *b"LK", *b"LR", *b"LS",
    *b"LT", *b"LU", *b"LV", *b"LY", *b"MA", *b"MC", *b"MD", *b"ME", *b"MF", *b"MG", *b"MH", *b"MK",
    *b"ML", *b"MM", *b"MN", *b"MO", *b"MP", *b"MQ", *b"MR", *b"MS", *b"MT", *b"MU", *b"MV", *b"MW",
    *b"MX", *b"MY", *b"MZ", *b"NA", *b"NC", *b"NE", *b"NF", *b"NG", *b"NI", *b"NL", *b"NO", *b"NP",
    *b"NR", *b"NU", *b"NZ", *b"OM", *b"PA", *b"PE", *b"PF", *b"PG", *b"PH", *b"PK", *b"PL", *b"PM",
    *b"PN", *b"PR", *b"PS", *b"PT", *b"PW", *b"PY", *b"QA", *b"RE", *b"RO", *b"RS", *b"RU", *b"RW",
    *b"SA", *b"SB", *b"SC", *b"SD", *b"SE", *b"SG", *b"SH", *b"SI", *b"SJ", *b"SK", *b"SL", *b"SM",
    *b"SN", *b"SO", *b"SR", *b"SS", *b"ST", *b"SV", *b"SX", *b"SY", *b"SZ", *b"TC", *b"TD", *b"TF",
    *b"TG", *b"TH", *b"TJ", *b"TK", *b"TL", *b"TM", *b"TN", *b"TO", *b"TR", *b"TT", *b"TV", *b"TW",
    *b"TZ", *b"UA", *b"UG", *b"UM", *b"US", *b"UY", *b"UZ", *b"VA", *b"VC", *b"VE", *b"VG", *b"VI",
    *b"VN", *b"VU", *b"WF", *b"WS", *b"YE", *b"YT", *b"ZA", *b"ZM", *b"ZW",
];

/// User-assigned codes accepted anyway: XK (Kosovo) is what the European Commission, CLDR
/// and the common IP-geolocation databases use, so clicks from Kosovo arrive with it (the
/// collector accepts any two upper-case letters) and must be possible to filter on.
pub const EXTRA: [[u8; 2]; 1] = [*b"XK"];

/// Whether `code` (upper case) is an assigned code or one of [`EXTRA`].
pub fn is_known(code: [u8; 2]) -> bool {
    ASSIGNED.binary_search(&code).is_ok() || EXTRA.contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_upper_case_and_complete() {
        assert!(ASSIGNED.windows(2).all(|w| w[0] < w[1]));
        assert!(ASSIGNED.iter().flatten().all(u8::is_ascii_uppercase));
        // 249 since South Sudan (SS) was added in 2011.
        assert_eq!(ASSIGNED.len(), 249);
    }

    #[test]
    fn known_and_unknown_codes() {
        for c in [
            b"US", b"DE", b"GB", b"SS", b"CW", b"AX", b"ZW", b"AD", b"XK",
        ] {
            assert!(is_known(*c), "{}", String::from_utf8_lossy(c));
        }
        // User-assigned, exceptionally reserved, withdrawn, never assigned.
        for c in [
            b"XX", b"ZZ", b"AA", b"QM", b"UK", b"EU", b"AN", b"CS", b"YU", b"OO",
        ] {
            assert!(!is_known(*c), "{}", String::from_utf8_lossy(c));
        }
    }
}
