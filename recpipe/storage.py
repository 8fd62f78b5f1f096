"""Where raw files are read from: a folder on this machine's file systems, or object storage named
by a URL (s3://bucket/raw, gs://..., abfs://...), through fsspec and universal_pathlib.

A URL's files are read by the workers themselves, so no machine needs a copy. Credentials and
endpoints come the way each store's library looks for them, on the client and on every worker:
the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_CONNECTION_STRING, ...), the libraries' configuration files, or the machine's
role; or from --storage-options, a JSON object of the library's options (s3fs's endpoint_url,
key, secret, ...), which `configure` hands to this process and cluster.share_storage_options to
every worker.
s3fs is installed with requirements.txt; gcsfs (gs://) and adlfs (abfs://) are not.
"""

import argparse
import json
import re
import urllib.parse
from pathlib import Path

from recpipe import cli
from recpipe.cli import UserError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}


def local_folders(args, names, urls=()):
    """Check that the folder flags `names` of `args` are paths on this machine's file systems, turning a
    file:// URL into its path; a URL of anything else (s3://, gs://, abfs://, ...) is a UserError, but for the
    flags in `urls`, which may name object storage (`path`).

    Without this, pathlib would read s3://bucket/raw as the folder s3:/bucket/raw and report it missing.
    """
    for name in names:
        text = getattr(args, name, None)
        match = _URL.match(str(text)) if text is not None else None
        if match is None:
            continue
        scheme = match.group(1).lower()
        if scheme == "file":
            parsed = urllib.parse.urlparse(str(text))
            if parsed.netloc in ("", "localhost"):
                setattr(args, name, urllib.parse.unquote(parsed.path))
                continue
        if name in urls:
            continue
        raise UserError(f"{cli.flag(name)} {text}: a {scheme}:// URL; this version writes to file systems only (it "
                        "reads object storage through --raw alone): give a local folder, or one of a file system "
                        "every machine of the cluster mounts (docs/cluster.md)")


def options_flag(text):
    """--storage-options: a JSON object, or an argparse error saying what it is instead."""
    try:
        options = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}); give an object, e.g. "
                                         "'{\"endpoint_url\": \"https://s3.example.com\"}'") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give one, e.g. '{{\"anon\": true}}'")
    return options


def configure(url, options):
    """Make `options` the defaults of every file system of `url`'s scheme in this process (fsspec's
    configuration, which new file system instances take up)."""
    if not options or not is_url(url):
        return
    import fsspec.config  # here, like universal_pathlib below: the training side reads local folders without them
    scheme = str(url).split("://", 1)[0].lower()
    fsspec.config.conf[scheme] = {**fsspec.config.conf.get(scheme, {}), **options}


def is_url(text):
    return _URL.match(str(text)) is not None


def path(text):
    """A pathlib.Path for a local path; a UPath (the same interface, over fsspec) for a URL of object storage.
    An unknown scheme, or one whose library is not installed, is a UserError."""
    text = str(text)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme not in PACKAGES:
        raise UserError(f"{text}: {scheme}:// is not a storage this pipeline reads; give a local folder or an "
                        f"s3://, gs:// or abfs:// URL")
    from upath import UPath  # here: only a URL needs it
    try:
        return UPath(text)
    except ImportError:
        raise UserError(f"{text}: reading {scheme}:// needs the {PACKAGES[scheme]} package: "
                        f"`pip install {PACKAGES[scheme]}` on this machine and every worker") from None


def name(file):
    """The last part of a path or URL: its file name."""
    return str(file).rstrip("/").rsplit("/", 1)[-1]


def bucket(url):
    """The bucket (or container) of a URL, as a path: s3://bucket/raw -> s3://bucket."""
    scheme, rest = str(url).split("://", 1)
    return path(f"{scheme}://{rest.split('/', 1)[0]}")


def stat(file):
    """(size in bytes, modification time in ns) of a raw file, local or in object storage."""
    if not is_url(file):
        info = Path(file).stat()
        return info.st_size, info.st_mtime_ns
    info = path(file).stat()
    return int(info.st_size), int(info.st_mtime * 10**9)


def relative(file, folder):
    """`file`'s name below `folder`, with / between parts."""
    return str(file)[len(str(folder)):].lstrip("/") if is_url(folder) else str(Path(file).relative_to(folder))


def failure(error, where):
    """A UserError for an error of object storage at `where` (a URL): what the library said, in one line."""
    kind = type(error).__name__
    text = str(error) or kind
    if "NoCredentials" in kind or "Unable to locate credentials" in text:
        cause = "no credentials found (set them in the environment or the library's config file)"
    elif "EndpointConnection" in kind or "Could not connect" in text or "Cannot connect" in text:
        cause = f"the endpoint cannot be reached ({text})"
    elif "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        cause = f"the bucket does not exist ({text})"
    else:
        cause = f"{kind}: {text}"
    return UserError(f"{where}: cannot be read: {cause}")
