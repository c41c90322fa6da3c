//! The UniFFI bindings generator, built at the library's exact UniFFI version:
//! `uniffi-bindgen generate --library target/debug/libadclick_ffi.so --language python
//! --out-dir out/` (see scripts/gen-bindings.sh).
fn main() {
    uniffi::uniffi_bindgen_main()
}
