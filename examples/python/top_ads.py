#!/usr/bin/env python3
"""List the top ads and one ad's per-minute clicks from an adclick aggregator over gRPC.

Uses grpcio and stubs generated from the published contract
(proto/proto/adclick/v1/adclick.proto) with grpcio-tools, into a temporary directory at
start: nothing generated is committed, and the stubs always match the proto next to this
script. Set up the interpreter with `bash scripts/setup-python.sh` (installs grpcio and
grpcio-tools into the project's .venv/), then:

    .venv/bin/python examples/python/top_ads.py --target 127.0.0.1:9090 \
        --key "$(cat .adclick-dev/admin.key)" --n 5 --last-minutes 60

Output, one fact per line (tested by tests/tests/clients.rs, which parses it):

    range from_ms=... to_ms=... watermark_ms=...
    top rank=1 ad=7 clicks=120
    ...
    series ad=7 granularity=minute
    minute start=2026-01-01T00:03:00Z start_ms=... clicks=12 unique_users=9
    ...
    total ad=7 clicks=120 unique_users=80

Errors (a bad key, an invalid argument, a rate limit) print the gRPC status code and
message on stderr and exit with status 1.
"""

import argparse
import datetime
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto", "proto"))
PROTO = "adclick/v1/adclick.proto"


def load_stubs(proto_root, out_dir):
    """Generates adclick_pb2 / adclick_pb2_grpc from the proto into out_dir, imports them."""
    # protoc's own well-known types (none are used today, but keep imports working).
    wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{wkt}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_root, PROTO),
    ]
    if protoc.main(args) != 0:
        sys.exit(f"error: protoc could not compile {os.path.join(proto_root, PROTO)}")
    sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("adclick.v1.adclick_pb2")
    pb2_grpc = importlib.import_module("adclick.v1.adclick_pb2_grpc")
    return pb2, pb2_grpc


def iso(ms):
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:9090", help="aggregator gRPC address")
    p.add_argument(
        "--key",
        default=os.environ.get("ADCLICK_KEY"),
        help="API key (default: $ADCLICK_KEY)",
    )
    p.add_argument("--n", type=int, default=10, help="how many top ads")
    p.add_argument("--last-minutes", type=int, default=60)
    p.add_argument("--from-ms", type=int, help="range start (with --to-ms, instead of --last-minutes)")
    p.add_argument("--to-ms", type=int, help="range end, exclusive")
    p.add_argument("--ad", type=int, help="the ad whose series to print (default: the top ad)")
    p.add_argument("--proto-root", default=DEFAULT_PROTO_ROOT, help="directory holding adclick/v1/adclick.proto")
    a = p.parse_args()
    if not a.key:
        sys.exit("error: give --key or set ADCLICK_KEY")
    if (a.from_ms is None) != (a.to_ms is None):
        sys.exit("error: give both --from-ms and --to-ms, or neither")

    with tempfile.TemporaryDirectory(prefix="adclick-stubs-") as out:
        pb2, pb2_grpc = load_stubs(a.proto_root, out)
        metadata = (("authorization", f"Bearer {a.key}"),)
        with grpc.insecure_channel(a.target) as channel:
            q = pb2_grpc.QueryServiceStub(channel)
            try:
                run(a, pb2, q, metadata)
            except grpc.RpcError as e:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
    return 0


def run(a, pb2, q, metadata):
    if a.from_ms is not None:
        top_req = pb2.TopAdsRequest(n=a.n, range=pb2.TimeRange(from_ms=a.from_ms, to_ms=a.to_ms))
    else:
        top_req = pb2.TopAdsRequest(n=a.n, last_minutes=a.last_minutes)
    top = q.TopAds(top_req, metadata=metadata, timeout=10)
    print(f"range from_ms={top.range.from_ms} to_ms={top.range.to_ms} watermark_ms={top.watermark_ms}")
    for rank, ad in enumerate(top.ads, start=1):
        print(f"top rank={rank} ad={ad.ad_id} clicks={ad.clicks}")

    ad_id = a.ad if a.ad is not None else (top.ads[0].ad_id if top.ads else None)
    if ad_id is None:
        print("series none: no ad has clicks in the range")
        return
    # The series covers the range TopAds answered (for --last-minutes: the server's minutes).
    series = q.GetAdClicks(
        pb2.GetAdClicksRequest(
            ad_id=ad_id,
            from_ms=top.range.from_ms,
            to_ms=top.range.to_ms,
            granularity=pb2.GRANULARITY_MINUTE,
        ),
        metadata=metadata,
        timeout=10,
    )
    print(f"series ad={series.ad_id} granularity=minute")
    for b in series.buckets:
        print(
            f"minute start={iso(b.start_ms)} start_ms={b.start_ms} "
            f"clicks={b.clicks} unique_users={b.unique_users}"
        )
    print(f"total ad={series.ad_id} clicks={series.total_clicks} unique_users={series.total_unique_users}")


if __name__ == "__main__":
    sys.exit(main())
