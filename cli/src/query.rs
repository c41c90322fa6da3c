//! `adclick query clicks|top|totals`: the advertiser's view, over the gRPC QueryService. Prints a
//! table or, with `--json`, one JSON document.

use std::path::PathBuf;
use std::time::Duration;

use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{self, Filter, GetAdClicksRequest, Granularity, TopAdsRequest};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::keys::{format_ms, now_ms};

/// Where and who.
#[derive(Debug, Args)]
pub struct Conn {
    /// Aggregator gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:9090", global = true)]
    endpoint: String,
    /// API key (default: $ADCLICK_API_KEY, else the key `adclick dev` wrote to
    /// .adclick-dev/admin.key).
    #[arg(long, env = "ADCLICK_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// Filters (repeat a flag for OR; different flags combine with AND).
#[derive(Debug, Args)]
pub struct Filters {
    /// ISO country code, e.g. --country US --country DE.
    #[arg(long)]
    country: Vec<String>,
    /// desktop, mobile, tablet or other.
    #[arg(long, value_enum)]
    device: Vec<DeviceArg>,
    /// Operating system.
    #[arg(long)]
    os: Vec<String>,
    /// Publisher site (or app id).
    #[arg(long)]
    site: Vec<String>,
    /// Advertiser id.
    #[arg(long)]
    advertiser: Vec<u64>,
    /// Campaign id.
    #[arg(long)]
    campaign: Vec<u64>,
    /// Client IP or CIDR prefix, e.g. 203.0.113.7 or 203.0.113.0/24 (click index).
    #[arg(long)]
    ip: Option<String>,
    /// Exact user id (click index).
    #[arg(long)]
    user_id: Option<String>,
    /// Which clicks to count: valid (billable, the default), invalid (the invalid-traffic
    /// rules'), or all.
    #[arg(long, value_enum)]
    traffic: Option<TrafficArg>,
}

/// `adclick.v1.Traffic` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TrafficArg {
    Valid,
    Invalid,
    All,
}

/// Device values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    /// Desktop.
    Desktop,
    /// Mobile.
    Mobile,
    /// Tablet.
    Tablet,
    /// Other.
    Other,
}

/// Bucket sizes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GranularityArg {
    /// One bucket per minute.
    Minute,
    /// One per hour.
    Hour,
    /// One per day (UTC).
    Day,
}

/// `adclick query ...`
#[derive(Debug, Subcommand)]
pub enum QueryCommand {
    /// Clicks of one ad per minute/hour/day, with unique users and totals.
    Clicks {
        /// The ad id.
        #[arg(long)]
        ad: u64,
        /// Range ending now, e.g. 60m, 24h.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60m")]
        last: Duration,
        /// Bucket size.
        #[arg(long, value_enum, default_value_t = GranularityArg::Minute)]
        granularity: GranularityArg,
        #[command(flatten)]
        filters: Filters,
    },
    /// The most clicked ads.
    Top {
        /// How many ads.
        #[arg(long, default_value_t = 10)]
        n: u32,
        /// Range ending now, e.g. 5m, 60m.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60m")]
        last: Duration,
        /// Keep watching (WatchTopAds): print the answer again whenever it changes, at
        /// most once per this interval (e.g. 1s), until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
        #[command(flatten)]
        filters: Filters,
    },
    /// Clicks of every ad of one campaign or advertiser, per bucket.
    Totals {
        /// What to sum: the ads of a campaign or of an advertiser.
        #[arg(value_enum)]
        scope: ScopeArg,
        /// The campaign or advertiser id.
        id: u64,
        /// Range ending now, e.g. 24h, 7d.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        last: Duration,
        /// Bucket size (at most 1,000 buckets).
        #[arg(long, value_enum, default_value_t = GranularityArg::Hour)]
        granularity: GranularityArg,
        #[command(flatten)]
        filters: Filters,
    },
}

/// What `totals` sums.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    /// The ads of one campaign.
    Campaign,
    /// The ads of one advertiser.
    Advertiser,
}

impl GranularityArg {
    fn to_wire(self) -> Granularity {
        match self {
            GranularityArg::Minute => Granularity::Minute,
            GranularityArg::Hour => Granularity::Hour,
            GranularityArg::Day => Granularity::Day,
        }
    }
}

/// `(start, clicks, unique users)` rows and the totals as the table both series print.
fn series_table(rows: &[(i64, u64, u64)], total: (u64, u64), watermark_ms: i64) -> String {
    let mut out = format!(
        "{:<26} {:>10} {:>13}\n",
        "start (UTC)", "clicks", "unique users"
    );
    for (start, clicks, users) in rows {
        out += &format!("{:<26} {:>10} {:>13}\n", format_ms(*start), clicks, users);
    }
    out += &format!("{:<26} {:>10} {:>13}\n", "total", total.0, total.1);
    out += &format!("(minutes before {} are final)\n", format_ms(watermark_ms));
    out
}

fn top_text(r: &v1::TopAdsResponse, minutes: u32, json: bool) -> String {
    if json {
        return format!(
            "{}\n",
            json!({
                "ads": r.ads.iter().map(|a| json!({"ad_id": a.ad_id, "clicks": a.clicks})).collect::<Vec<_>>(),
                "from_ms": r.range.as_ref().map(|x| x.from_ms), "to_ms": r.range.as_ref().map(|x| x.to_ms),
                "watermark_ms": r.watermark_ms,
            })
        );
    }
    let mut out = format!("{:>4} {:>12} {:>10}\n", "rank", "ad", "clicks");
    for (i, a) in r.ads.iter().enumerate() {
        out += &format!("{:>4} {:>12} {:>10}\n", i + 1, a.ad_id, a.clicks);
    }
    if r.ads.is_empty() {
        out += &format!("(no clicks in the last {minutes} minutes)\n");
    }
    out
}

impl Filters {
    fn traffic(&self) -> i32 {
        (match self.traffic {
            Some(TrafficArg::Valid) => v1::Traffic::Valid,
            Some(TrafficArg::Invalid) => v1::Traffic::Invalid,
            Some(TrafficArg::All) => v1::Traffic::All,
            None => v1::Traffic::Valid,
        }) as i32
    }

    fn to_wire(&self) -> Filter {
        Filter {
            country: self
                .country
                .iter()
                .map(|c| c.to_ascii_uppercase())
                .collect(),
            device: self
                .device
                .iter()
                .map(|d| match d {
                    DeviceArg::Desktop => v1::Device::Desktop,
                    DeviceArg::Mobile => v1::Device::Mobile,
                    DeviceArg::Tablet => v1::Device::Tablet,
                    DeviceArg::Other => v1::Device::Other,
                } as i32)
                .collect(),
            os: self.os.clone(),
            site: self.site.clone(),
            advertiser_id: self.advertiser.clone(),
            campaign_id: self.campaign.clone(),
            ip: self.ip.clone().unwrap_or_default(),
            user_id: self.user_id.clone().unwrap_or_default(),
        }
    }
}

fn api_key(conn: &Conn) -> Result<String> {
    if let Some(k) = &conn.api_key {
        return Ok(k.clone());
    }
    let dev = PathBuf::from(".adclick-dev/admin.key");
    match std::fs::read_to_string(&dev) {
        Ok(k) => Ok(k.trim().to_string()),
        Err(_) => bail!(
            "no API key: pass --api-key KEY or set ADCLICK_API_KEY (adclick dev writes one to .adclick-dev/admin.key)"
        ),
    }
}

pub fn run(conn: Conn, cmd: QueryCommand) -> Result<()> {
    let key = api_key(&conn)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let out = rt.block_on(async move {
        let mut out = String::new();
        let channel = tonic::transport::Endpoint::from_shared(conn.endpoint.clone())
            .with_context(|| format!("invalid --endpoint {:?}", conn.endpoint))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to the aggregator at {}", conn.endpoint))?;
        let mut client = QueryServiceClient::new(channel);
        let auth = |r: &mut tonic::metadata::MetadataMap| -> Result<()> {
            r.insert("authorization", format!("Bearer {key}").parse().context("API key is not valid header text")?);
            Ok(())
        };
        match cmd {
            QueryCommand::Clicks { ad, last, granularity, filters } => {
                let to = now_ms();
                let from = to - i64::try_from(last.as_millis()).unwrap_or(i64::MAX);
                let g = granularity.to_wire();
                let mut req = tonic::Request::new(GetAdClicksRequest {
                    fill_empty: None,
                    ad_id: ad,
                    from_ms: from,
                    to_ms: to,
                    granularity: g as i32,
                    filter: Some(filters.to_wire()),
                    traffic: filters.traffic(),
                });
                auth(req.metadata_mut())?;
                let r = client.get_ad_clicks(req).await.map_err(status)?.into_inner();
                if conn.json {
                    out += &format!("{}\n", json!({
                        "ad_id": r.ad_id,
                        "buckets": r.buckets.iter().map(|b| json!({"start_ms": b.start_ms, "clicks": b.clicks, "unique_users": b.unique_users})).collect::<Vec<_>>(),
                        "total_clicks": r.total_clicks, "total_unique_users": r.total_unique_users, "watermark_ms": r.watermark_ms,
                    }));
                } else {
                    let rows: Vec<(i64, u64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks, b.unique_users)).collect();
                    out += &series_table(&rows, (r.total_clicks, r.total_unique_users), r.watermark_ms);
                }
            }
            QueryCommand::Top { n, last, watch, filters } => {
                let minutes = u32::try_from(last.as_secs().div_ceil(60).max(1)).unwrap_or(u32::MAX);
                let query = TopAdsRequest {
                    n,
                    window: Some(v1::top_ads_request::Window::LastMinutes(minutes)),
                    filter: Some(filters.to_wire()),
                    traffic: filters.traffic(),
                };
                let Some(every) = watch else {
                    let mut req = tonic::Request::new(query);
                    auth(req.metadata_mut())?;
                    let r = client.top_ads(req).await.map_err(status)?.into_inner();
                    out += &top_text(&r, minutes, conn.json);
                    return Ok(out);
                };
                let interval_ms = u32::try_from(every.as_millis()).unwrap_or(u32::MAX);
                let mut req = tonic::Request::new(v1::WatchTopAdsRequest { query: Some(query), interval_ms });
                auth(req.metadata_mut())?;
                let mut updates = client.watch_top_ads(req).await.map_err(status)?.into_inner();
                // Each update as it comes (JSON: one document per line), until the server
                // ends the watch or Ctrl-C.
                while let Some(r) = updates.message().await.map_err(status)? {
                    let mut text = String::new();
                    if !conn.json {
                        text += &format!("-- {} --\n", format_ms(now_ms()));
                    }
                    text += &top_text(&r, minutes, conn.json);
                    let mut stdout = std::io::stdout().lock();
                    if std::io::Write::write_all(&mut stdout, text.as_bytes()).and_then(|()| std::io::Write::flush(&mut stdout)).is_err() {
                        break;
                    }
                }
            }
            QueryCommand::Totals { scope, id, last, granularity, filters } => {
                let to = now_ms();
                let from = to - i64::try_from(last.as_millis()).unwrap_or(i64::MAX);
                let mut req = tonic::Request::new(v1::GetTotalsRequest {
                    scope: match scope {
                        ScopeArg::Campaign => v1::TotalsScope::Campaign,
                        ScopeArg::Advertiser => v1::TotalsScope::Advertiser,
                    } as i32,
                    id,
                    from_ms: from,
                    to_ms: to,
                    granularity: granularity.to_wire() as i32,
                    filter: Some(filters.to_wire()),
                    fill_empty: None,
                    include_sketches: false,
                    traffic: filters.traffic(),
                });
                auth(req.metadata_mut())?;
                let r = client.get_totals(req).await.map_err(status)?.into_inner();
                if conn.json {
                    out += &format!("{}\n", json!({
                        "id": r.id,
                        "buckets": r.buckets.iter().map(|b| json!({"start_ms": b.start_ms, "clicks": b.clicks, "unique_users": b.unique_users})).collect::<Vec<_>>(),
                        "total_clicks": r.total_clicks, "total_unique_users": r.total_unique_users, "ads": r.ads, "watermark_ms": r.watermark_ms,
                    }));
                } else {
                    let rows: Vec<(i64, u64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks, b.unique_users)).collect();
                    out += &series_table(&rows, (r.total_clicks, r.total_unique_users), r.watermark_ms);
                    out += &format!("({} ads with clicks)\n", r.ads);
                }
            }
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
    Ok(())
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        format!("{:?}", s.code()).to_uppercase(),
        s.message()
    )
}
