"""Where the pipeline reads and writes: a folder on this machine's file systems, or object storage named
by a URL (s3://bucket/raw, gs://..., abfs://...), through fsspec and universal_pathlib.

`path` gives a pathlib.Path or a UPath (the same interface over fsspec), so the code that lists, opens
and deletes files reads the same for both; `arrow` gives what PyArrow needs to read or write one.
A URL's files are read and written by the workers themselves, so no machine needs a copy. Credentials and
endpoints come the way each store's library looks for them, on the client and on every worker:
the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_CONNECTION_STRING, ...), the libraries' configuration files, or the machine's
role; or from --storage-options, a JSON object of the library's options (s3fs's endpoint_url,
key, secret, ...), which `configure` hands to this process and cluster.share_storage_options to
every worker.
s3fs is installed with requirements.txt; gcsfs (gs://) and adlfs (abfs://) are not.
"""

import argparse
import errno
import json
import os
import re
import shutil
import urllib.parse
from pathlib import Path

from recpipe import cli
from recpipe.cli import OutputError, UserError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}


def local_folders(args, names, urls=()):
    """Check that the folder flags `names` of `args` are paths on this machine's file systems, turning a
    file:// URL into its path; a URL of anything else (s3://, gs://, abfs://, ...) is a UserError, but for the
    flags in `urls`, which may name object storage (`path`): --raw, --data, --preprocessors.

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
        raise UserError(f"{cli.flag(name)} {text}: a {scheme}:// URL, and {cli.flag(name)} is a folder on this "
                        "machine: give a local path (object storage is for --raw, --data and --preprocessors, "
                        "docs/cluster.md)")


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


def urls(args):
    """The URLs of object storage among the folder flags of a script's `args` (--raw, --data, --preprocessors)."""
    return [str(getattr(args, name)) for name in ("raw", "data", "preprocessors")
            if getattr(args, name, None) is not None and is_url(getattr(args, name))]


def configure(urls, options):
    """Make `options` the defaults of every file system of the schemes of `urls` (folders given: paths or URLs)
    in this process (fsspec's configuration, which new file system instances take up)."""
    schemes = {str(url).split("://", 1)[0].lower() for url in urls if is_url(url)}
    if not options or not schemes:
        return
    import fsspec.config  # here, like universal_pathlib below: the training side reads local folders without them
    for scheme in schemes:
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
        # Without a listings cache: workers in other processes write what this one lists.
        return UPath(text, use_listings_cache=False)
    except ImportError:
        raise UserError(f"{text}: reading {scheme}:// needs the {PACKAGES[scheme]} package: "
                        f"`pip install {PACKAGES[scheme]}` on this machine and every worker") from None


def arrow(file):
    """(where, filesystem): the arguments that PyArrow's readers and writers take for a path or URL."""
    if not is_url(file):
        return str(file), None
    file = file if hasattr(file, "fs") else path(file)
    return file.path, file.fs


def read_bytes(file):
    """The content of a file, local or in object storage (one request there: no request for its size first)."""
    if not is_url(file):
        return Path(file).read_bytes()
    file = path(file)
    # From byte 0 on: one ranged GET. Without a range s3fs asks for the size first (a HEAD) to fetch a
    # large object in parallel parts, a request more for each of the many small files stages write.
    return file.fs.cat_file(file.path, start=0)


def remove_tree(folder, last=None):
    """Delete a folder and everything under it, local or in object storage (a prefix); nothing when it is
    missing. In object storage, which deletes one object at a time, its file `last` (a name directly in it)
    goes after all the others: a marker or manifest that proves whose the rest is. There, objects the store
    refuses to delete raise NotDeleted (and `last` is kept)."""
    if not is_url(folder):
        if Path(folder).exists():
            shutil.rmtree(folder)
        return
    folder = path(folder)
    files = folder.fs.find(folder.path)
    final = f"{folder.path}/{last}"
    kept = [final] if final in files else []
    stayed, why = delete(folder, [file for file in files if file != final])
    if not stayed:
        (stayed, why), kept = delete(folder, kept), []
    if stayed:
        raise NotDeleted(_not_deleted(folder, stayed + kept, len(files), why))


class NotDeleted(OutputError):
    """Objects of ours that a delete left in place: the store refused them (credentials that may not delete
    there, an object lock). Exit status 74, like a read-only folder."""


def delete(folder, names):
    """Delete objects (paths as `folder.fs` names them) under a folder in object storage: (those still there
    afterwards, {name or None: why the store refused it}).

    A delete is not taken at its word: S3's DeleteObjects answers 200 with an error per object it refused,
    which s3fs's bulk delete drops (and S3's quiet mode lists nothing deleted), and other stores' libraries
    may drop them too. So what is still listed afterwards is what stayed; S3's errors say why.
    """
    if not names:
        return [], {}
    store = folder.fs
    why = {}
    try:
        if hasattr(store, "call_s3"):  # s3fs
            why = _delete_s3(store, names)
        else:
            store.rm(names)
    except PermissionError as error:  # the whole request refused
        why = {None: str(error) or type(error).__name__}
    store.invalidate_cache(folder.path)
    return sorted(set(names) & set(store.find(folder.path))), why


def _delete_s3(store, names):
    """Delete objects through S3's DeleteObjects, 1,000 a request: {name: 'Code (Message)'} of those it refused."""
    keys, refused = {}, {}
    for name in names:
        bucket, key, _ = store.split_path(name)
        keys.setdefault(bucket, []).append(key)
    for bucket, listed in keys.items():
        for start in range(0, len(listed), 1000):
            answer = store.call_s3("delete_objects", Bucket=bucket, Delete={
                "Objects": [{"Key": key} for key in listed[start:start + 1000]], "Quiet": True})
            for error in answer.get("Errors", []):
                refused[f"{bucket}/{error.get('Key')}"] = f"{error.get('Code')} ({error.get('Message')})"
    return refused


def _not_deleted(folder, stayed, total, why):
    """NotDeleted's one line: how many objects stayed, the store's reasons, and the fix."""
    reasons = sorted({reason for name, reason in why.items() if name is None or name in stayed})
    cause = "; ".join(reasons) or "the store reported no error, yet they are still listed"
    if _denied(cause):
        cause += ": these credentials may not delete there"
    scheme = str(folder).split("://", 1)[0]
    return (f"could not delete {len(stayed)} of {total} objects under {folder}/: {cause} (e.g. "
            f"{scheme}://{stayed[0]}); they are still there: run this again with credentials that may delete there "
            "(on S3: s3:DeleteObject on the prefix)")


def _denied(text):
    return any(word in text for word in ("AccessDenied", "Access Denied", "Forbidden"))


def copy(source, target):
    """Copy a file, making the folders above its target; in object storage the store copies it itself."""
    from recpipe import folders  # folders reads paths through this module
    if not is_url(target):
        folders.make_parents(target)
        shutil.copyfile(source, target)
        return
    source, target = path(source), path(target)
    target.fs.copy(source.path, target.path)


def share(source, target):
    """Give `target` the bytes of the file `source`: a hard link on this machine, so that a stage passing a file
    through unchanged writes nothing and the two folders hold one copy of it, which stays whole under either
    name when the other folder is deleted (the stages never change a published file in place; they publish
    new files). A copy where a link cannot be made (another file system, one without links) and in object
    storage, where the store copies it itself."""
    if not is_url(target) and not is_url(source):
        from recpipe import folders  # folders reads paths through this module
        folders.make_parents(target)
        try:
            os.link(source, target)
            return
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    copy(source, target)


def files(folder):
    """{name below `folder`, with / between parts: size in bytes} of every file under a folder, local or in
    object storage (one listing there, not a request per file)."""
    folder = path(folder)
    if not is_url(folder):
        return {str(file.relative_to(folder)): file.stat().st_size
                for file in folder.rglob("*") if file.is_file()}
    found = folder.fs.find(folder.path, detail=True)
    return {name[len(folder.path):].lstrip("/"): int(info["size"]) for name, info in found.items()}


def absolute(where):
    """A path made absolute, or a URL as it is: what a manifest or config records of where something was."""
    return str(where) if is_url(where) else str(Path(where).resolve())


def name(file):
    """The last part of a path or URL: its file name."""
    return str(file).rstrip("/").rsplit("/", 1)[-1]


def bucket(url):
    """The bucket (or container) of a URL, as a path: s3://bucket/raw -> s3://bucket."""
    scheme, rest = str(url).split("://", 1)
    return path(f"{scheme}://{rest.split('/', 1)[0]}")


def stats(files, folder):
    """{file: (size in bytes, modification time in ns)} of raw files under `folder`, local or in object storage
    (one listing there, not a request per object)."""
    if not is_url(folder):
        return {file: (info.st_size, info.st_mtime_ns) for file in files for info in [Path(file).stat()]}
    # What UPath.stat() makes of the same listing entry (the modification time of each store's own field);
    # universal_pathlib is pinned in requirements.txt.
    from upath._stat import UPathStatResult
    folder = path(folder)
    found = folder.fs.find(folder.path, detail=True)
    listed = {}
    for file in files:
        info = UPathStatResult.from_info(found[path(file).path])
        listed[file] = (int(info.st_size), int(info.st_mtime * 10**9))
    return listed


def relative(file, folder):
    """`file`'s name below `folder`, with / between parts."""
    return str(file)[len(str(folder)):].lstrip("/") if is_url(folder) else str(Path(file).relative_to(folder))


def failure(error, where=None):
    """The error to raise for an error of object storage at `where` (a URL, when known): what the library said,
    in one line, and whether reading or writing failed. A UserError (exit 2), but an OutputError (74, as for a
    read-only folder) when a write was refused; this project's own errors are returned as they are."""
    if isinstance(error, (UserError, OutputError)):
        return error
    kind = type(error).__name__
    text = str(error) or kind
    writing = _operation(error).startswith(_WRITES)
    verb = "written" if writing else "read"
    if "NoCredentials" in kind or "Unable to locate credentials" in text:
        cause = "no credentials found (set them in the environment or the library's config file)"
    elif "EndpointConnection" in kind or "Could not connect" in text or "Cannot connect" in text:
        cause = f"the endpoint cannot be reached ({text})"
    elif "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        cause = f"the bucket does not exist ({text})"
    elif isinstance(error, PermissionError) or _denied(text):
        cause = (f"access denied ({text}): these credentials may not {'write' if writing else 'read'} there; use "
                 f"credentials that may{', or write elsewhere' if writing else ''}")
        if writing:
            return OutputError(f"{where}: cannot be written: {cause}" if where
                               else f"object storage cannot be written: {cause}")
    else:
        cause = f"{kind}: {text}"
    return UserError(f"{where}: cannot be {verb}: {cause}" if where else f"object storage cannot be used: {cause}")


# The store's requests that write (S3's names, as botocore gives them): a refusal of one is an output that
# cannot be written, not an input that cannot be read.
_WRITES = ("Put", "Delete", "Copy", "Create", "Upload", "Complete", "Abort", "Restore")


def _operation(error):
    """The name of the request that failed (botocore's ClientError.operation_name, on `error` or an error it
    was raised from: s3fs raises PermissionError from it); '' when none says."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(getattr(error, "operation_name", None), str):
            return error.operation_name
        error = error.__cause__ or error.__context__
    return ""


# The libraries behind fsspec's object stores: an exception of theirs is the store's (or the network's, or the
# credentials'), not this project's.
_STORE_LIBRARIES = {"botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs", "google", "adlfs", "azure"}


def store_error(error):
    """The exception of an object store's library that `error` is, or was raised from; None if none is."""
    while error is not None:
        if type(error).__module__.split(".")[0] in _STORE_LIBRARIES:
            return error
        error = error.__cause__ or error.__context__
    return None


def require_bucket(url, flag=None):
    """A UserError unless the bucket (or container) of a URL exists and may be listed: one line naming the URL (and
    its flag) and the cause, a missing bucket, an unreachable endpoint or no credentials."""
    where = bucket(url)
    named = f"{flag} {url}" if flag else str(url)
    try:
        where.fs.info(where.path)
    except FileNotFoundError:
        raise UserError(f"{named}: the bucket (or container) {where} does not exist, or these credentials may not "
                        "list it") from None
    except Exception as error:  # the store's library: no credentials, an unreachable endpoint, access denied
        raise failure(error, named) from None
