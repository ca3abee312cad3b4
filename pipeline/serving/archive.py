"""Model archives: the exported TorchScript model + the self-contained handler as a ``.mar``.

Built with ``torch-model-archiver`` (the CLI of the pinned package, run with this Python),
so the result is exactly what TorchServe expects. The archive is named
``{model_name}-{version}.mar`` and its sha256 is returned; :func:`verify_archive` checks it
again before every registration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import MODEL_NAME_RE, VERSION_RE
from pipeline.storage import sha256_file

HANDLER_FILE = Path(__file__).with_name("handler.py")
MODEL_FILE = "model.pt"
HANDLER_CONFIG = "handler_config.json"


class ArchiveError(RuntimeError):
    """Building or verifying a model archive failed; the message says which file and why."""


@dataclass(frozen=True)
class ModelArchive:
    """A built ``.mar``: where it is, what it holds, and its checksum."""

    path: str
    model_name: str
    version: str
    sha256: str
    size: int

    @property
    def file_name(self) -> str:
        return Path(self.path).name


def archive_name(model_name: str, version: str) -> str:
    return f"{model_name}-{version}.mar"


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise ArchiveError(
            f"invalid model version {version!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it becomes part of /predictions/<model>/<version>)"
        )
    return version


def build_archive(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str,
    version: str,
    handler_options: dict[str, Any] | None = None,
) -> ModelArchive:
    """Package ``model_path`` (an asr-retune export) with the handler into ``out_dir/{name}-{version}.mar``.

    ``handler_options`` become the archive's ``handler_config.json`` (see the handler's
    docstring; ``delay_ms``/``fail_above_s`` are fault-injection knobs for tests only).
    The file appears atomically; an existing archive of the same name is replaced.
    """
    check_version(version)
    if not MODEL_NAME_RE.match(model_name):
        raise ArchiveError(f"invalid model name {model_name!r}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ArchiveError(f"exported model not found: {model_path}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / archive_name(model_name, version)
    with tempfile.TemporaryDirectory(prefix=".mar-", dir=out_dir) as tmp:
        tmp_path = Path(tmp)
        staged_model = tmp_path / MODEL_FILE  # the serialized file keeps a fixed name inside the archive
        shutil.copyfile(model_path, staged_model)
        options_file = tmp_path / HANDLER_CONFIG
        options_file.write_text(json.dumps(handler_options or {}, indent=2, sort_keys=True), encoding="utf-8")
        cmd = [
            sys.executable,
            "-c",
            "import sys; from model_archiver.model_packaging import generate_model_archive; sys.exit(generate_model_archive())",
            "--model-name", model_name,
            "--version", version,
            "--serialized-file", str(staged_model),
            "--handler", str(HANDLER_FILE),
            "--extra-files", str(options_file),
            "--export-path", str(tmp_path),
            "--force",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        built = tmp_path / f"{model_name}.mar"
        if proc.returncode != 0 or not built.is_file():
            raise ArchiveError(
                f"torch-model-archiver failed for {model_path} (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        os.replace(built, target)
    return ModelArchive(str(target), model_name, version, sha256_file(target), target.stat().st_size)


def verify_archive(path: str | os.PathLike, sha256: str) -> None:
    """Raise :class:`ArchiveError` unless the file at ``path`` has checksum ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"model archive not found: {path}")
    actual = sha256_file(path)
    if actual != sha256:
        raise ArchiveError(
            f"model archive {path} has sha256 {actual}, expected {sha256}: refusing to register a changed or corrupt archive"
        )
