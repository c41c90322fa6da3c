//! `adclick impression mint|verify`: what an ad server does when it places an ad, and the
//! exact check a collector applies, from the command line.

use std::path::PathBuf;
use std::time::Duration;

use adclick_proto::token::Impression;
use adclick_sdk::{AdPlacement, ImpressionSigner};
use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::json;

use crate::keys::{format_ms, now_ms, read_key_file};

/// Output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// One token per line (mint) / a readable listing (verify).
    Text,
    /// One JSON object per line.
    Jsonl,
}

/// `adclick impression ...`
#[derive(Debug, Subcommand)]
pub enum ImpressionCommand {
    /// Mint signed impression tokens with the current key.
    Mint {
        /// The key file.
        #[arg(long, default_value = "keys.toml")]
        keys: PathBuf,
        /// Ad id.
        #[arg(long)]
        ad: u64,
        /// Advertiser id.
        #[arg(long)]
        advertiser: u64,
        /// Campaign id.
        #[arg(long)]
        campaign: u64,
        /// Where a click lands (http:// or https://).
        #[arg(long)]
        landing_url: String,
        /// Token lifetime, e.g. 30m, 1h, 2d (1s to 30d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many tokens (each with its own impression id).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
        /// text: one token per line; jsonl: {token, impression_id, ad_id, expires_at_ms}.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Verify a token and print its payload, or the precise reason it is rejected.
    Verify {
        /// The key file.
        #[arg(long, default_value = "keys.toml")]
        keys: PathBuf,
        /// Clock skew allowed on issue and expiry times, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        skew: Duration,
        /// Verify as of this time (ms since the epoch) instead of now.
        #[arg(long)]
        now_ms: Option<i64>,
        /// text or jsonl.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// The token text.
        token: String,
    },
}

pub fn run(cmd: ImpressionCommand) -> Result<()> {
    match cmd {
        ImpressionCommand::Mint {
            keys,
            ad,
            advertiser,
            campaign,
            landing_url,
            ttl,
            count,
            format,
        } => {
            check_ttl(ttl)?;
            let file = read_key_file(&keys)?;
            let signer = ImpressionSigner::new(file.keyring).with_ttl(ttl)?;
            let placement = AdPlacement {
                ad_id: ad,
                advertiser_id: advertiser,
                campaign_id: campaign,
                landing_url,
            };
            let now = now_ms();
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for _ in 0..count {
                let minted = signer
                    .mint_at(&placement, now)
                    .context("cannot mint token")?;
                let line = match format {
                    Format::Text => minted.token,
                    Format::Jsonl => json!({
                        "token": minted.token,
                        "impression_id": minted.impression.impression_id_hex(),
                        "ad_id": minted.impression.ad_id,
                        "expires_at_ms": minted.impression.expires_at_ms,
                    })
                    .to_string(),
                };
                std::io::Write::write_all(&mut out, line.as_bytes())?;
                std::io::Write::write_all(&mut out, b"\n")?;
            }
            std::io::Write::flush(&mut out)?;
        }
        ImpressionCommand::Verify {
            keys,
            skew,
            now_ms: at,
            format,
            token,
        } => {
            let file = read_key_file(&keys)?;
            let now = at.unwrap_or_else(now_ms);
            let skew_ms = i64::try_from(skew.as_millis()).unwrap_or(i64::MAX);
            match file.keyring.verify(token.trim(), now, skew_ms) {
                Ok(imp) => print_impression(&imp, format),
                Err(e) => bail!("token rejected ({}): {e}", e.reason()),
            }
        }
    }
    Ok(())
}

/// Refuses a lifetime the pipeline would not count (`adclick_proto::countable`): the
/// collectors reject clicks on such tokens as `token_lifetime_too_long`.
fn check_ttl(ttl: Duration) -> Result<()> {
    let max = adclick_proto::countable::MAX_TOKEN_LIFETIME_MS;
    let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    if ms > max || ttl < Duration::from_secs(1) {
        bail!(
            "--ttl of {} s: ttl must be between 1s and 30d, the maximum token lifetime \
             ({max} ms); collectors reject clicks on longer tokens (token_lifetime_too_long)",
            ttl.as_secs()
        );
    }
    Ok(())
}

fn print_impression(imp: &Impression, format: Format) {
    match format {
        Format::Jsonl => println!(
            "{}",
            json!({
                "valid": true,
                "impression_id": imp.impression_id_hex(),
                "ad_id": imp.ad_id,
                "advertiser_id": imp.advertiser_id,
                "campaign_id": imp.campaign_id,
                "landing_url": imp.landing_url,
                "issued_at_ms": imp.issued_at_ms,
                "expires_at_ms": imp.expires_at_ms,
                "key_id": imp.key_id,
            })
        ),
        Format::Text => {
            println!("valid token");
            println!("  impression_id  {}", imp.impression_id_hex());
            println!("  ad_id          {}", imp.ad_id);
            println!("  advertiser_id  {}", imp.advertiser_id);
            println!("  campaign_id    {}", imp.campaign_id);
            println!("  landing_url    {}", imp.landing_url);
            println!(
                "  issued_at      {} ({} ms)",
                format_ms(imp.issued_at_ms),
                imp.issued_at_ms
            );
            println!(
                "  expires_at     {} ({} ms)",
                format_ms(imp.expires_at_ms),
                imp.expires_at_ms
            );
            println!("  key_id         {}", imp.key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_above_the_countable_maximum_is_refused_with_the_reason() {
        let ten_years = Duration::from_secs(3650 * 86_400);
        let e = check_ttl(ten_years).unwrap_err().to_string();
        assert!(e.contains("maximum token lifetime"), "{e}");
        assert!(e.contains("token_lifetime_too_long"), "{e}");
        assert!(check_ttl(Duration::from_secs(30 * 86_400)).is_ok());
        assert!(check_ttl(Duration::from_secs(30 * 86_400 + 1)).is_err());
        assert!(check_ttl(Duration::from_millis(10)).is_err());
    }
}
