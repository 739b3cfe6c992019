"""Hugging Face Hub side of the fetch stage: is the Hub reachable, and what its errors mean.

`hub_errors` turns huggingface_hub's exceptions into one `FetchError` that says what to do:
gated, not found (the repo, the revision or a file; also a bare HTTP 404 that huggingface_hub
reports as "cannot find it in the cache"), or unreachable (no network, offline mode, the cache
lacking the files). A 404 is never reported as "cannot reach the Hub".
"""
from __future__ import annotations

import contextlib
import socket
import urllib.parse
import urllib.request
from typing import Iterator

from qlora_kit.sources.http import FetchError, OfflineError, _log, _proxy_note, _unreachable, http_timeout


def offline_help(recipe: str) -> str:
    return (
        "This step needs the network. Without it, either:\n"
        f"  - pre-download on a networked machine (`qlora-kit fetch --recipe {recipe}`) and copy\n"
        f"    data/{recipe}/raw and models/{recipe}/base (or the Hugging Face cache, below) here;\n"
        "  - use files you already have: --set data.source=local --set data.path=FILE\n"
        "    (and --set model.source=local --set model.name=DIR for the base model);\n"
        "  - fill the Hugging Face cache on a networked machine (`hf download REPO --revision REV`,\n"
        "    add `--repo-type dataset FILE` for a dataset file), copy it here, point HF_HOME at it\n"
        "    and set HF_HUB_OFFLINE=1."
    )


def _short(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    if cause is not None and not isinstance(e, OfflineError):
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def hub_unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached (one TCP connect), or None when it can.

    huggingface_hub retries a failed connection for ~25 s before it falls back to its cache; this
    probe lets the kit tell "no network" at once and go straight to the cache (local_files_only).
    Behind a proxy the probe would prove nothing, so it is skipped there.
    """
    from huggingface_hub import constants

    u = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(host):
        return None
    timeout = min(http_timeout(), 10.0)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        where = host if u.port is None else f"{host}:{port}"
        return _unreachable(where, e, timeout) or f"cannot connect to {where} ({e})"


def _hub_mode(what: str) -> tuple[bool, str | None]:
    """(local_files_only, why the Hub is unreachable): offline mode or a failed probe use the cache only."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return True, None
    why = hub_unreachable()
    if why:
        _log(f"{what}: {why}; looking in the local Hugging Face cache instead")
    return why is not None, why


@contextlib.contextmanager
def hub_errors(what: str, repo: str, repo_type: str, revision: str | None, recipe: str,
               unreachable: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into FetchError messages that say what to do."""
    from huggingface_hub import constants, errors

    try:
        import httpx2
        transport: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # the transport library is huggingface_hub's business; stay importable without it
        transport = ()
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    at = f"{repo}@{revision or 'main'}"
    try:
        yield
    except errors.GatedRepoError as e:
        raise FetchError(f"{what}: {at} is gated. Accept its licence at {page} with your account, then give the "
                         "token through the HF_TOKEN environment variable or `hf auth login` (the kit reads no "
                         "token from flags or files in the checkout).") from e
    except errors.RepositoryNotFoundError as e:
        raise FetchError(f"{what}: {repo_type} repo {repo} not found (or private: set HF_TOKEN or run "
                         "`hf auth login`)") from e
    except errors.RevisionNotFoundError as e:
        raise FetchError(f"{what}: revision {revision!r} not found in {repo}; check the pinned revision") from e
    except errors.RemoteEntryNotFoundError as e:
        raise FetchError(f"{what}: {at} has no such file ({_short(e)})") from e
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, *transport) as e:
        if _http_status(e) == 404:  # the Hub answered: the repo, revision or file does not exist there
            raise FetchError(f"{what}: {repo_type} repo {at} not found on {constants.ENDPOINT} (HTTP 404): check the "
                             "repo id and revision the recipe pins (a private repo needs HF_TOKEN)") from e
        cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE}) does not hold {at} (or holds it incompletely)"
        if unreachable:
            why = f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}): {unreachable}, and {cache}"
        elif constants.is_offline_mode():
            why = f"HF_HUB_OFFLINE=1 and {cache}"
        else:
            why = f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) for {at}: {_short(e)}{_proxy_note()}"
        raise OfflineError(f"{what}: {why}\n{offline_help(recipe)}") from e
    except errors.HfHubHTTPError as e:
        raise FetchError(f"{what}: {at}: {str(e).splitlines()[0]}") from e


def _http_status(e: BaseException | None) -> int | None:
    """The HTTP status somewhere in an exception's chain (huggingface_hub wraps it), else None."""
    for _ in range(8):
        if e is None:
            return None
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        e = e.__cause__ or e.__context__
    return None
