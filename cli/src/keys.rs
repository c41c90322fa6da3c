//! `adclick keys new|rotate|list`: create and rotate the HMAC keys in `keys.toml`; and
//! `adclick keys ingest new`: a fresh collector-to-aggregator ingest key, printed as the two
//! config lines that use it. Files are written with mode 0600, atomically (temp file,
//! fsync, rename).

use std::fs::{self, OpenOptions};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use anyhow::{Context, Result, bail};
use clap::Subcommand;

/// `adclick keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key file with one random 32-byte key (id 1).
    New {
        /// Where to write the key file.
        #[arg(long, default_value = "keys.toml")]
        out: PathBuf,
        /// Replace an existing file (tokens signed with its keys stop verifying).
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Do nothing (exit 0) if the file exists: for init jobs run at every deployment.
        #[arg(long)]
        if_missing: bool,
    },
    /// Add a new current key; the previous one stays accepted for tokens still alive.
    Rotate {
        /// The key file to rotate.
        #[arg(long, default_value = "keys.toml")]
        keys: PathBuf,
        /// Keys to keep in all, the new one included (older ones are dropped).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
        keep: u32,
    },
    /// List key ids and creation times (never the secrets).
    List {
        /// The key file.
        #[arg(long, default_value = "keys.toml")]
        keys: PathBuf,
    },
    /// Ingest keys: the secret collectors present to aggregators.
    #[command(subcommand)]
    Ingest(IngestKeyCommand),
}

/// `adclick keys ingest ...`
#[derive(Debug, Subcommand)]
pub enum IngestKeyCommand {
    /// Print a fresh random ingest key as the aggregator's `ingest_keys` line and the
    /// collectors' `aggregator_key` line. To rotate, list the old and the new key in
    /// `ingest_keys`, move every collector to the new one, then drop the old one.
    New {
        /// Also write the bare key to this file (mode 0600).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::New {
            out,
            force,
            if_missing,
        } => {
            if out.exists() && if_missing {
                println!("{} exists: kept as it is", out.display());
                return Ok(());
            }
            if out.exists() && !force {
                bail!(
                    "{} already exists; use `adclick keys rotate --keys {}` to add a key, \
                     or --force to replace it (tokens signed with it will stop verifying)",
                    out.display(),
                    out.display()
                );
            }
            let file = KeyFile {
                keyring: Keyring::new(random_key(1)?),
                created: vec![(1, now_ms())],
            };
            write_key_file(&out, &file)?;
            println!("wrote {} (key id 1, mode 0600)", out.display());
        }
        KeysCommand::Rotate { keys, keep } => {
            let mut file = read_key_file(&keys)?;
            let id = file.keyring.next_id();
            let dropped = file.keyring.rotate(random_key(id)?, keep as usize)?;
            file.created.retain(|(k, _)| !dropped.contains(k));
            file.created.insert(0, (id, now_ms()));
            write_key_file(&keys, &file)?;
            let accepted: Vec<String> = file
                .keyring
                .keys()
                .skip(1)
                .map(|k| k.id().to_string())
                .collect();
            println!(
                "current key is now {id}; still accepted: {}",
                accepted.join(", ")
            );
            if !dropped.is_empty() {
                let ids: Vec<String> = dropped.iter().map(u32::to_string).collect();
                println!(
                    "dropped key(s) {}: tokens signed with them no longer verify",
                    ids.join(", ")
                );
            }
            println!("reload collectors and ad servers so they pick up the new key");
        }
        KeysCommand::Ingest(IngestKeyCommand::New { out, force }) => {
            let key = ingest_key()?;
            if let Some(out) = &out {
                if out.exists() && !force {
                    bail!(
                        "{} already exists; use --force to replace it (collectors using it \
                         will be refused once it is gone from ingest_keys)",
                        out.display()
                    );
                }
                write_private(out, format!("{key}\n").as_bytes())?;
                eprintln!("wrote {} (mode 0600)", out.display());
            }
            println!("# aggregator.toml (keep any key still in use while collectors move over)");
            println!("ingest_keys = [\"{key}\"]");
            println!("# collector.toml");
            println!("aggregator_key = \"{key}\"");
        }
        KeysCommand::List { keys } => {
            let file = read_key_file(&keys)?;
            let current = file.keyring.current().id();
            for k in file.keyring.keys() {
                let created = file
                    .created
                    .iter()
                    .find(|(id, _)| *id == k.id())
                    .map_or(0, |(_, t)| *t);
                let role = if k.id() == current {
                    "current"
                } else {
                    "previous"
                };
                println!("{:>4}  {role:<8}  created {}", k.id(), format_ms(created));
            }
        }
    }
    Ok(())
}

/// Reads and parses a key file, with the path in every error.
pub fn read_key_file(path: &Path) -> Result<KeyFile> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read key file {} (create one with `adclick keys new --out {}`)",
            path.display(),
            path.display()
        )
    })?;
    KeyFile::parse(&text).with_context(|| format!("in {}", path.display()))
}

/// A random ingest key: 32 bytes from the OS, in hex (64 characters).
pub fn ingest_key() -> Result<String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(hex::encode(secret))
}

pub fn write_key_file(path: &Path, file: &KeyFile) -> Result<()> {
    write_private(path, file.render()?.as_bytes())
}

/// Writes `bytes` to `path` with mode 0600, atomically (temp file, fsync, rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn random_key(id: u32) -> Result<SigningKey> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(SigningKey::new(id, &secret)?)
}

/// Wall-clock milliseconds since the Unix epoch: the SDK's system clock, the one the
/// product's clients use.
pub fn now_ms() -> i64 {
    use adclick_sdk::core::Clock as _;
    adclick_sdk::native::SystemClock.now_ms()
}

/// RFC 3339 with milliseconds, or the raw number when out of range.
pub fn format_ms(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms))
                .to_string()
        }
        Err(_) => format!("{ms} ms"),
    }
}
