"""Where a dataset's files come from: an already downloaded folder (`--from_dir`) or the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from course_lib.prepare.errors import InputError
from course_lib.prepare.paths import require_dir
from course_lib.util.cli import first_line


def snapshot(repo_id: str, allow_patterns: list[str], from_dir: Path | None) -> Path:
    """The dataset folder: `from_dir` when given, else a hub download of only the files needed.

    Any hub or network failure becomes one readable line that says how to go on without the hub.
    """
    if from_dir is not None:
        return require_dir(from_dir, f"a downloaded copy of the {repo_id} dataset (--from_dir)")
    from huggingface_hub import snapshot_download

    print(f"downloading {allow_patterns} from the {repo_id} dataset repository ...")
    try:
        path = snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=allow_patterns)
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one readable line
        reason = first_line(err)
        raise InputError(f"could not download {repo_id} ({reason}); download it yourself and pass --from_dir") from None
    return Path(path)
