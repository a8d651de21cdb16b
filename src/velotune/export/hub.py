"""`push_to_hub_*`: build the same folder as the matching `save_pretrained_*` locally, then
upload it with huggingface_hub. The local folder is complete before any network call, so an
offline machine or a bad token loses nothing: the error says where the files are."""

from __future__ import annotations

from pathlib import Path

from .. import settings
from .gguf_writer import save_pretrained_gguf
from .merged import save_pretrained_merged


class HubUploadError(RuntimeError):
    """The export was written locally but could not be uploaded."""


def _local_folder(repo_id: str, save_directory) -> Path:
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1:
        raise ValueError(f"repo_id={repo_id!r}: expected 'username/model-name'")
    return Path(save_directory) if save_directory is not None else Path(repo_id.split("/")[-1])


def upload_folder(folder: Path, repo_id: str, token: str | None = None, private: bool | None = None,
                  commit_message: str = "Upload model exported with velotune") -> str:
    """Create `repo_id` if needed and upload `folder`; HubUploadError naming the local copy otherwise."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    except Exception as error:  # noqa: BLE001 - any hub/network failure gets the same actionable message
        offline = settings.current().hub_offline
        reason = "the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1)" if offline else str(error)
        raise HubUploadError(
            f"could not upload to {repo_id!r}: {reason}. The export itself is complete in {folder.resolve()}; "
            "upload it later with `huggingface-cli upload` or push_to_hub_* once online (pass token=... if "
            "the repo needs one).") from error
    return f"https://huggingface.co/{repo_id}"


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                       private=None, save_directory=None, **kwargs) -> str:
    folder = _local_folder(repo_id, save_directory)
    save_pretrained_merged(model, folder, tokenizer, save_method=save_method, **kwargs)
    return upload_folder(folder, repo_id, token, private)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method="fast_quantized", token=None,
                     private=None, save_directory=None, **kwargs) -> str:
    folder = _local_folder(repo_id, save_directory)
    save_pretrained_gguf(model, folder, tokenizer, quantization_method=quantization_method, **kwargs)
    return upload_folder(folder, repo_id, token, private)
