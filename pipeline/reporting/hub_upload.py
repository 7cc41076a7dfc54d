"""Upload of a publication bundle to the Hub with ``huggingface_hub``: access checked before any file is sent,
then one commit per group of files (README last), skipping files whose content the Hub already has, so a rerun
after a failure continues where it stopped. Messages are redacted of tokens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.reporting.card import redact

log = logging.getLogger("posttrain.publish")


class PublishError(RuntimeError):
    """Publication failed or was refused; the message says what was uploaded and how to continue."""


@dataclass
class Bundle:
    """Files of one repo: ``path_in_repo -> local file``, uploaded in ``groups`` (one commit each)."""

    root: Path
    repo_type: str
    files: dict[str, Path] = field(default_factory=dict)
    groups: list[tuple[str, list[str]]] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    stale_prefix: str | None = None
    """Remote files under this prefix that the bundle lacks are deleted with the last commit."""


@dataclass
class PublishResult:
    """What ``publish`` did."""

    dataset_bundle: Bundle
    model_bundle: Bundle | None = None
    uploaded: list[str] = field(default_factory=list)
    """Groups (configs, card, model) committed by this call."""
    skipped: list[str] = field(default_factory=list)
    """Groups already on the Hub with the same content."""
    urls: list[str] = field(default_factory=list)




def _same_content(local: Path, remote) -> bool:
    """True when the remote file (a ``RepoFile`` from the tree listing) has the local file's content:
    LFS files compare sha256, regular files their git blob id."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        with local.open("rb") as f:
            return remote.lfs.sha256 == sha_fileobj(f).hex()
    return remote.blob_id == git_hash(local.read_bytes())


def _describe(exc: BaseException, endpoint: str, secrets: tuple[str, ...]) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = exc.server_message or str(exc).splitlines()[0]
        text = f"HTTP {status} from {endpoint}: {server}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(text, secrets)


class HubUploader:
    """Checks access, then commits a bundle's groups, skipping content already on the Hub."""

    def __init__(self, token: str, endpoint: str | None, echo: Callable[[str], None]):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token, library_name="posttrain")
        self.endpoint = self.api.endpoint
        self.secrets = (token,)
        self.echo = echo

    def fail(self, what: str, exc: BaseException, fix: str) -> PublishError:
        return PublishError(f"{what}: {_describe(exc, self.endpoint, self.secrets)}; {fix}")

    def check_access(self) -> str:
        """The user name; PublishError (nothing uploaded) when the token or network does not work."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            info = self.api.whoami()
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise self.fail(f"the Hub at {self.endpoint} refused the token, nothing was uploaded", exc,
                                "fix: make a new write token at https://huggingface.co/settings/tokens and set "
                                "HF_TOKEN (or run `hf auth login`)") from None
            raise self.fail(f"the Hub at {self.endpoint} answered the token check with an error, nothing was "
                            "uploaded", exc, "fix: retry later (or check HF_ENDPOINT)") from None
        except Exception as exc:  # connection refused, DNS, TLS, timeouts: the transport's own types
            raise self.fail(f"cannot reach the Hub at {self.endpoint}, nothing was uploaded", exc,
                            "fix: check the network (or HF_ENDPOINT) and rerun") from None
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PublishError(f"the token for {info.get('name')} at {self.endpoint} is read-only, nothing was "
                               "uploaded; fix: use a token with write access (https://huggingface.co/settings/tokens)")
        return str(info.get("name"))

    def ensure_repo(self, repo_id: str, repo_type: str, private: bool) -> str:
        try:
            url = self.api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        except Exception as exc:
            raise self.fail(f"the Hub refused to create or open the {repo_type} repo {repo_id}, nothing was "
                            "uploaded to it", exc,
                            f"fix: check that your token can write to the namespace '{repo_id.split('/')[0]}'"
                            ) from None
        return str(url)

    def remote_files(self, repo_id: str, repo_type: str) -> dict[str, Any]:
        from huggingface_hub.hf_api import RepoFile

        try:
            return {f.path: f for f in self.api.list_repo_tree(repo_id, repo_type=repo_type, recursive=True)
                    if isinstance(f, RepoFile)}
        except Exception as exc:
            raise self.fail(f"cannot list the files of {repo_id}, nothing was uploaded to it", exc,
                            "fix: check the network and rerun") from None

    def upload(self, bundle: Bundle, repo_id: str, result: PublishResult, private: bool) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        result.urls.append(self.ensure_repo(repo_id, bundle.repo_type, private))
        remote = self.remote_files(repo_id, bundle.repo_type)
        done: list[str] = [*result.skipped, *result.uploaded]  # incl. an earlier repo of this call
        for i, (group, paths) in enumerate(bundle.groups):
            changed = [p for p in paths if p not in remote or not _same_content(bundle.files[p], remote[p])]
            deletes = []
            if bundle.repo_type == "dataset" and group != "card" and paths:
                prefix = paths[0].rsplit("/", 1)[0] + "/" if "/" in paths[0] else None
                if prefix:  # an older upload of this config with another shard count
                    deletes = [p for p in remote if p.startswith(prefix) and p not in paths]
            if i == len(bundle.groups) - 1 and bundle.stale_prefix:  # configs this run no longer has
                deletes += [p for p in remote if p.startswith(bundle.stale_prefix) and p not in bundle.files
                            and p not in deletes]
            if not changed and not deletes:
                self.echo(f"  {group}: already on the Hub, skipped")
                result.skipped.append(group)
                done.append(group)
                continue
            ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(bundle.files[p]))
                              for p in changed]
            ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
            rows = f", {bundle.rows[group]} rows" if group in bundle.rows else ""
            size = sum(bundle.files[p].stat().st_size for p in changed)
            self.echo(f"  {group}: uploading {len(changed)} file(s), {size / 2**20:.2f} MB{rows}"
                      + (f", deleting {len(deletes)} stale file(s)" if deletes else ""))
            try:
                self.api.create_commit(repo_id, ops, repo_type=bundle.repo_type,
                                       commit_message=f"posttrain: upload {group}{rows}")
            except Exception as exc:
                left = [g for g, _ in bundle.groups[i:]]
                raise PublishError(
                    f"upload to {repo_id} stopped at '{group}': {_describe(exc, self.endpoint, self.secrets)}. "
                    f"Already on the Hub: {', '.join(done) or 'nothing'}. Not uploaded: {', '.join(left)}. "
                    "Fix the cause and rerun the same command: what is already on the Hub is skipped."
                ) from None
            for p in deletes:  # so the last commit does not delete them again
                remote.pop(p, None)
            result.uploaded.append(group)
            done.append(group)
