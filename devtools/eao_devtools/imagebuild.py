"""The operator and runtime images, built from images/Dockerfile by buildah over Debian bases.

No Docker engine runs on this project's machines, so the images are built by buildah (Debian's
package, an OCI builder that reads Dockerfiles; `--isolation chroot`, as root) over two bases made
here by mmdebstrap from Debian bookworm's packages and passed to the Dockerfile as build arguments:

- ``PYTHON_IMAGE``: python3 (3.11, as in the official image the Dockerfile defaults to) and CA
  certificates; the final images' base, with no pip;
- ``BUILD_IMAGE``: the same plus python3-venv and pip, for the build stage only.

Users keep building on the official Python image; nothing in the Dockerfile knows about this.
The build stage fetches wheels from PyPI through the host's network with the host's CA bundle
mounted read-only for that step (it is never copied into an image).

Each build is cached under a key made of the Dockerfile, every file the build context copies and
the bases' package lists; the images are written as docker-archive tarballs that the node's
containerd imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eao_devtools.checkout import repo_root

DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python-is-python3", "ca-certificates")
BUILD_PACKAGES = (*BASE_PACKAGES, "python3-venv", "python3-pip")
# Debian's packages the builder needs (installed by the Makefile with the other system packages).
DEBIAN_PACKAGES = ("buildah", "mmdebstrap")
# What the Dockerfile's COPY lines take from the context (a test checks the two agree).
CONTEXT_PATHS = ("pyproject.toml", "README.md", "agent_contract", "operator", "agent_runtime", "images/Dockerfile")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
REGISTRY = "ghcr.io/enterprise-agent"
# Documentation and translations stay out of the bases (copyright files stay).
_DPKG_EXCLUDES = (
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class BuiltImage:
    target: str  # the Dockerfile's stage: "operator" or "runtime"
    reference: str  # the name the chart (operator) and the examples (runtime) use by default
    archive: Path  # a docker-archive tarball for `ctr images import`


def project_version() -> str:
    with (repo_root() / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def image_references() -> dict[str, str]:
    """Target -> the reference the chart's values and the examples name by default."""
    version = project_version()
    return {target: f"{REGISTRY}/enterprise-agent-{target}:{version}" for target in ("operator", "runtime")}


def _run(*command: str, log: Path, timeout: float = 1800) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=timeout)
    if result.returncode != 0:
        raise ImageBuildError(f"{command[0]} failed (exit {result.returncode}); see {log}")


def _has_image(reference: str) -> bool:
    return (
        subprocess.run(["/usr/bin/buildah", "inspect", "--type", "image", reference], capture_output=True).returncode
        == 0
    )


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:12]


def _context_key(root: Path) -> str:
    """Every file the build copies, by path and content (bytecode caches left out)."""
    parts: list[bytes] = []
    for entry in CONTEXT_PATHS:
        path = root / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix == ".pyc" or file.name.endswith(".egg-info"):
                continue
            parts += [str(file.relative_to(root)).encode(), file.read_bytes()]
    return _digest(*parts)


def ensure_base(name: str, packages: tuple[str, ...], log: Path) -> str:
    """A Debian base image in buildah's storage, made once per package list; returns its reference."""
    reference = f"localhost/eao-{name}:{DEBIAN_SUITE}-{_digest(*(p.encode() for p in packages))}"
    if _has_image(reference):
        return reference
    with tempfile.TemporaryDirectory(prefix="eao-base-") as work:
        rootfs = Path(work) / "rootfs.tar"
        _run(
            "mmdebstrap", "--variant=minbase", "--mode=root", *_DPKG_EXCLUDES,
            f"--include={','.join(packages)}", DEBIAN_SUITE, str(rootfs), log=log,
        )  # fmt: skip
        (Path(work) / "Containerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n')
        _run("buildah", "bud", "--isolation", "chroot", "-t", reference, work, log=log)
    return reference


def build_images(cache: Path, say: Callable[[str], None] = print) -> list[BuiltImage]:
    """Both targets of images/Dockerfile as docker-archives, rebuilt only when what they copy changed."""
    missing = [tool for tool in DEBIAN_PACKAGES if shutil.which(tool) is None]
    if missing:
        raise ImageBuildError(f"building the images needs {', '.join(missing)} (make system-packages installs them)")
    root = repo_root()
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    key = _digest(_context_key(root).encode(), repr((BASE_PACKAGES, BUILD_PACKAGES)).encode())
    references = image_references()
    images = [BuiltImage(t, ref, cache / key / f"{t}.tar") for t, ref in references.items()]
    if all(image.archive.is_file() for image in images):
        return images
    started = time.monotonic()
    log.write_text("")
    say(f"building the operator and runtime images from images/Dockerfile with buildah (log: {log})")
    base = ensure_base("python", BASE_PACKAGES, log)
    build_base = ensure_base("python-build", BUILD_PACKAGES, log)
    mounts = ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"] if HOST_CA_BUNDLE.is_file() else []
    (cache / key).mkdir(exist_ok=True)
    for image in images:
        _run(
            "buildah", "bud", "--isolation", "chroot", "--layers", *mounts,
            "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"BUILD_IMAGE={build_base}",
            "-f", str(root / "images" / "Dockerfile"), "--target", image.target, "-t", image.reference, str(root),
            log=log,
        )  # fmt: skip
        partial = image.archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        _run("buildah", "push", image.reference, f"docker-archive:{partial}:{image.reference}", log=log)
        partial.rename(image.archive)
    say(f"images built in {time.monotonic() - started:.0f}s: {', '.join(references.values())}")
    _release_disk(cache, key, log)
    return images


# Archives of other sources are kept this long: another checkout's job (a CI clone beside a
# working tree) may be importing them right now.
STALE_ARCHIVE_SECONDS = 6 * 3600


def _release_disk(cache: Path, key: str, log: Path) -> None:
    """Each build leaves about 1 GB behind: archives of earlier sources in the cache and untagged
    layers in buildah's store. A disk that fills up fails every later test, so archives of other
    sources go once stale, and untagged layers at once (the tagged bases, which the next build
    starts from, stay). Best effort: the images are built already."""
    now = time.time()
    for folder in cache.iterdir():
        with contextlib.suppress(OSError):
            if folder.is_dir() and folder.name != key and now - folder.stat().st_mtime > STALE_ARCHIVE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(ImageBuildError):
        _run("buildah", "rmi", "--prune", log=log)


# A PostgreSQL for examples on the real node (examples/shared-state.yaml): Debian's postgresql-15
# on the same bookworm base, run as a fixed non-root uid so `runAsNonRoot` can check it.
POSTGRES_IMAGE = "eao.local/postgres:15"
POSTGRES_UID = 10002
_POSTGRES_CONTAINERFILE = f"""FROM {{base}}
RUN usermod -u {POSTGRES_UID} postgres && groupmod -g {POSTGRES_UID} postgres \\
 && mkdir -p /var/run/postgresql && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER {POSTGRES_UID}:{POSTGRES_UID}
"""


def build_postgres_image(cache: Path, say: Callable[[str], None] = print) -> BuiltImage:
    """The example database's image as a docker-archive, built once."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"postgres-{_digest(_POSTGRES_CONTAINERFILE.encode())}.tar"
    image = BuiltImage("postgres", POSTGRES_IMAGE, archive)
    if archive.is_file():
        return image
    log = cache / "postgres-build.log"
    log.write_text("")
    say(f"building {POSTGRES_IMAGE} from Debian's postgresql-15 (log: {log})")
    base = ensure_base("postgres", ("postgresql-15",), log)
    with tempfile.TemporaryDirectory(prefix="eao-postgres-") as work:
        (Path(work) / "Containerfile").write_text(_POSTGRES_CONTAINERFILE.format(base=base))
        _run("buildah", "bud", "--isolation", "chroot", "-t", POSTGRES_IMAGE, work, log=log)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    _run("buildah", "push", POSTGRES_IMAGE, f"docker-archive:{partial}:{POSTGRES_IMAGE}", log=log)
    partial.rename(archive)
    return image
