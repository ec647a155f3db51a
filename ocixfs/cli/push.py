"""``ocixfs push``: upload an image and its blobs to an OCI registry."""

from __future__ import annotations

import argparse
import json

NAME = "push"
HELP = "upload an image and every blob it needs to an OCI registry"
DESCRIPTION = """\
Upload IMAGE (a local .ocix file), every blob it references (from its store directory,
as stored: the .zst form where there is one) and IMAGE.profile if present to an OCI
registry, as one OCI artifact that REF names. Blobs the registry already has are
skipped. 'ocixfs mount REF MOUNTPOINT' then mounts it straight from the registry, and
'--store REF' names it as a blob store of any mount.

REF is docker://HOST[:PORT]/REPO[:TAG] (skopeo's syntax; the tag defaults to latest).
Logins come from $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
~/.config/containers/auth.json and ~/.docker/config.json ($DOCKER_CONFIG), as podman
and docker write them. Loopback registries may speak plain http; others need https.

examples:
  ocixfs push debian.ocix docker://registry.example.org/images/debian:12
  ocixfs push app.ocix docker://127.0.0.1:5000/app:v2 --store /srv/store --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image's manifest (.ocix file)")
    parser.add_argument("reference", metavar="REF",
                        help="where to push: docker://HOST[:PORT]/REPO[:TAG]")
    parser.add_argument("--store", metavar="DIR",
                        help="the store directory holding the blobs (default: the "
                        "manifest's directory)")
    parser.add_argument("--tls-verify", choices=("true", "false"), default="true",
                        help="false: allow plain http to a registry that is not on this "
                        "host (default true: https with certificate checks)")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="PEM CA certificates to trust in addition to the system's")
    parser.add_argument("--jobs", type=int, default=8, metavar="N",
                        help="blobs hashed and uploaded at once (default 8)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON (counts, bytes, the digest to pin)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ocixfs.config import FetchConfig
    from ocixfs.errors import UsageError
    from ocixfs.image.format import Chunk
    from ocixfs.image.loading import image_from_bytes, read_manifest_bytes
    from ocixfs.image.tree import Tree
    from ocixfs.progress import format_bytes
    from ocixfs.store.registryauth import with_login
    from ocixfs.store.spec import LocalStore, parse_registry_ref, stores_or_default
    from ocixfs.tools.compare import blob_sizes
    from ocixfs.tools.push import push_image

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    target = with_login(parse_registry_ref(args.reference, "REF"),
                        tls_verify=args.tls_verify == "true")
    store = stores_or_default([args.store] if args.store else [], args.image)[0]
    if not isinstance(store, LocalStore):
        raise UsageError(f"--store {store.label}: push reads blobs from a local directory")
    manifest = read_manifest_bytes(args.image)
    image = image_from_bytes(manifest, args.image)
    tree = Tree.from_manifest(image.manifest)
    blobs = [Chunk(size, digest) for digest, size in blob_sizes(tree).items()]
    summary = push_image(image, Path(args.image), manifest, blobs, store.path, target,
                         FetchConfig(ca_file=args.ca_file), threads=args.jobs)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    print("\n".join([
        f"pushed {args.image} to {summary.reference}",
        f"  digest          {summary.digest}  (pin: {summary.pinned})",
        f"  image           {summary.image_digest}",
        f"  uploaded        {summary.uploaded} blobs ({format_bytes(summary.uploaded_bytes)})",
        f"  already there   {summary.skipped} blobs ({format_bytes(summary.skipped_bytes)})",
        f"  time            {summary.seconds:.2f} s",
    ]))
    return 0
