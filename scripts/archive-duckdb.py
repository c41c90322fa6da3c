#!/usr/bin/env python3
"""Reads the raw click archive with DuckDB and prints a JSON summary: row count, distinct
click keys, rows by status/reason, counted clicks per ad, valid (billed) clicks per ad
(counted, less the ones a later `moved` row reclassified), and the partitions seen.

    python scripts/archive-duckdb.py --dir data/archive
    python scripts/archive-duckdb.py --s3 s3://bucket/raw/clicks --endpoint http://127.0.0.1:5000

With --s3 the objects are copied with boto3 (credentials from the environment, as for the
aggregator) into a temporary directory first: DuckDB's own S3 reader (httpfs) is an
extension it downloads at run time, which a machine without internet access cannot do.
Where it can, `read_parquet('s3://bucket/raw/clicks/**/*.parquet', hive_partitioning=true)`
reads the bucket directly with the same queries.

Needs `duckdb` (and `boto3` for --s3): bash scripts/setup-archive-python.sh installs both.
"""
import argparse
import json
import os
import sys
import tempfile

import duckdb


def download(url, endpoint, into):
    import boto3

    if not url.startswith("s3://"):
        sys.exit("--s3 takes s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint,
                      region_name=os.environ.get("AWS_REGION", "us-east-1"))
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rel = key[len(prefix):].lstrip("/") if prefix else key
            if not rel.endswith(".parquet"):
                continue
            dest = os.path.join(into, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            s3.download_file(bucket, key, dest)
            n += 1
    return n


def summary(root):
    files = os.path.join(root, "**", "*.parquet")
    con = duckdb.connect()
    # A view cannot take a prepared parameter: quote the path as an SQL string literal.
    lit = "'" + files.replace("'", "''") + "'"
    con.execute(
        f"CREATE VIEW clicks AS SELECT * FROM read_parquet({lit}, hive_partitioning = true, union_by_name = true, "
        "filename = true)"
    )
    one = lambda q: con.execute(q).fetchone()[0]
    # `moved` rows are not clicks: each names an earlier click's row (log_pos,
    # click_index) that a rule moved to invalid later (docs/archive.md).
    out = {
        "rows": one("SELECT count(*) FROM clicks WHERE status <> 'moved'"),
        "distinct_keys": one(
            "SELECT count(*) FROM (SELECT DISTINCT collector_id, collector_seq, click_index "
            "FROM clicks WHERE status <> 'moved')"
        ),
        "moved": one("SELECT count(*) FROM clicks WHERE status = 'moved'"),
        "by_status": {
            f"{s}/{r or ''}": n
            for s, r, n in con.execute(
                "SELECT status, reason, count(*) FROM clicks GROUP BY ALL ORDER BY ALL"
            ).fetchall()
        },
        "counted_by_ad": {
            str(ad): n
            for ad, n in con.execute(
                "SELECT ad_id, count(*) FROM clicks WHERE status = 'counted' GROUP BY ad_id ORDER BY ad_id"
            ).fetchall()
        },
        # A `moved` row names its click by (writer, log_pos, click_index); the writer id is
        # the file name's prefix (`<writer_id>-<seq>.parquet`).
        "valid_by_ad": {
            str(ad): n
            for ad, n in con.execute(
                "WITH k AS (SELECT *, regexp_extract(filename, '([^/]+)-[0-9]+\\.parquet$', 1) "
                "AS writer FROM clicks) "
                "SELECT c.ad_id, count(*) FROM k c WHERE c.status = 'counted' AND NOT EXISTS "
                "(SELECT 1 FROM k m WHERE m.status = 'moved' AND m.writer = c.writer "
                "AND m.log_pos = c.log_pos AND m.click_index = c.click_index) "
                "GROUP BY c.ad_id ORDER BY c.ad_id"
            ).fetchall()
        },
        "partitions": [
            f"dt={d}/hour={h:02d}" if isinstance(h, int) else f"dt={d}/hour={h}"
            for d, h in con.execute(
                "SELECT DISTINCT CAST(dt AS VARCHAR), hour FROM clicks ORDER BY ALL"
            ).fetchall()
        ],
        "event_hour_matches_partition": one(
            "SELECT bool_and(strftime(event_time AT TIME ZONE 'UTC', '%Y-%m-%d') = CAST(dt AS VARCHAR) "
            "AND CAST(strftime(event_time AT TIME ZONE 'UTC', '%H') AS INTEGER) = CAST(hour AS INTEGER)) "
            "FROM clicks WHERE status <> 'invalid'"
        ),
    }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--dir", help="a local archive directory")
    g.add_argument("--s3", help="s3://bucket/prefix of an S3-compatible archive")
    ap.add_argument("--endpoint", help="S3 endpoint URL (non-AWS stores)")
    a = ap.parse_args()
    if a.dir:
        print(json.dumps(summary(a.dir), sort_keys=True))
        return
    with tempfile.TemporaryDirectory() as tmp:
        n = download(a.s3, a.endpoint, tmp)
        out = summary(tmp)
        out["objects"] = n
        print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
