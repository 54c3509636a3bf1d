"""``vidalign annotate serve | invite | stats | export``: the human-preference web app."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub) -> None:
    """Register ``annotate`` and its subcommands."""
    an = sub.add_parser("annotate", help="collect human preferences in a local web app")
    asub = an.add_subparsers(dest="annotate_command", required=True)
    _add_serve(asub)
    inv = asub.add_parser("invite", help="make an annotator's access link (a token stored, hashed, in the db)")
    inv.add_argument("name", help="the annotator: labels made with this link are stored under this name")
    inv.add_argument("--db", required=True, help="the SQLite file `annotate serve` uses (created if missing)")
    inv.add_argument("--base-url", default=None, help="where annotators reach the app (default http://HOSTNAME:8765)")
    inv.add_argument("--revoke", action="store_true", help="revoke every link of NAME instead")
    inv.set_defaults(run=run_invite, name="annotate invite")
    st = asub.add_parser("stats", help="agreement (Cohen's / Fleiss' kappa), tie rate, progress")
    st.add_argument("--db", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(run=run_stats, name="annotate stats")
    ex = asub.add_parser("export", help="write the labels as a preference dataset")
    ex.add_argument("--db", required=True)
    ex.add_argument("out")
    ex.add_argument("--mode", choices=("majority", "all"), default="majority", help="one row per pair or per label")
    ex.add_argument("--min-labels", type=int, default=1, help="majority mode: pairs with fewer labels are left out")
    ex.add_argument(
        "--videos",
        choices=("copy", "hardlink", "symlink"),
        default="copy",
        help="how files get into OUT/videos (hardlink: no copy, trainable as is; symlink: links leave OUT, "
        "so training refuses them)",
    )
    ex.set_defaults(run=run_export, name="annotate export")


def _add_serve(asub) -> None:
    se = asub.add_parser("serve", help="serve the annotation page for pairs of videos")
    se.add_argument("pairs", help="a preference dataset directory, or `vidalign generate` output (index.jsonl)")
    se.add_argument("--db", required=True, help="SQLite file for the labels (created if missing)")
    se.add_argument("--per-pair", type=int, default=1, help="annotators each pair is shown to")
    se.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: needs access control)")
    se.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    se.add_argument("--root", default=None, help="folder videos may be served from (default: PAIRS)")
    se.add_argument("--cache-format", choices=("webm", "mp4"), default="webm", help="for converted GIFs/arrays")
    se.add_argument("--verbose", action="store_true", help="log every request")
    se.add_argument(
        "--secret",
        default=None,
        help="shared secret every request must carry (?token=S, then a cookie); default $VIDALIGN_ANNOTATE_SECRET",
    )
    se.add_argument(
        "--require-invite",
        action="store_true",
        help="every request needs a token: an invite (`annotate invite NAME`) or the --secret",
    )
    se.set_defaults(run=run_serve, name="annotate serve")


def run_serve(args: argparse.Namespace) -> int:
    from align.annotate.server import serve

    serve(
        args.pairs,
        args.db,
        args.host,
        args.port,
        args.per_pair,
        args.root,
        args.cache_format,
        args.verbose,
        secret=args.secret or os.environ.get("VIDALIGN_ANNOTATE_SECRET") or None,
        require_invite=args.require_invite,
    )
    return 0


def run_invite(args: argparse.Namespace) -> int:
    from align.annotate.server import invite_link
    from align.annotate.storage import LabelStore

    store = LabelStore(args.db)
    if args.revoke:
        print(f"revoked {store.revoke_invites(args.name)} invite(s) of {args.name}")
        return 0
    print(invite_link(args.base_url, store.add_invite(args.name)))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from align.annotate.stats import format_stats, json_safe, store_stats
    from align.annotate.storage import LabelStore

    stats = store_stats(LabelStore(args.db, create=False))
    print(json.dumps(json_safe(stats), indent=2) if args.json else format_stats(stats))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from align.annotate.export import export_dataset

    s = export_dataset(args.db, args.out, args.mode, args.min_labels, args.videos)
    print(f"wrote {s['rows']} rows ({s['pairs']} pairs; a={s['a']} b={s['b']} tie={s['tie']}) to {s['out']}")
    return 0
