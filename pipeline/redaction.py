"""Credentials never reach the terminal, the run directory or MLflow.

Credentials come from the environment (the AWS variables, ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``, ...). A tracking URI may carry them too
(``https://user:token@mlflow.example.com``): ``strip_tracking_credentials`` moves them into
MLflow's environment variables, which its REST client reads for every request, and leaves the URI
without them, so the config, the run directory, the printed lines and every sub-run (seeds,
isolation rows, sweep trials) only ever see the clean URI. ``redact`` is the last line of defence
for any text the pipeline writes: URL passwords, secret-looking query parameters and the values of
secret-looking environment variables become ``***``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s:@]*)(:[^/\s@]*)?@")
_QUERY_SECRET = re.compile(r"([?&][^=&\s#]*(?:token|secret|password|key|signature|sig|credential)[^=&\s#]*=)[^&\s#]+",
                           re.I)
MIN_SECRET_LEN = 6  # shorter environment values (e.g. "1") would mask ordinary text


_SECRET_PARTS = {"SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "CREDENTIALS", "APIKEY", "SIGNATURE"}


def secret_env_name(name: str) -> bool:
    """A variable that holds a credential by its name's words: ``AWS_SECRET_ACCESS_KEY``,
    ``MLFLOW_TRACKING_PASSWORD``, ``HF_TOKEN``, ``WANDB_API_KEY`` (not ``TOKENIZERS_PARALLELISM``)."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", name.upper()) if p]
    pairs = {f"{a}_{b}" for a, b in zip(parts, parts[1:])}
    return bool(_SECRET_PARTS & set(parts)) or bool({"API_KEY", "ACCESS_KEY"} & pairs)


def secret_env_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-looking variables, longest first."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if secret_env_name(k) and v and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """``text`` with URL passwords (a lone user part too: it is often a token), secret query
    parameters and secret environment values masked."""
    if not text:
        return text

    def userinfo(m: re.Match) -> str:
        scheme, user, password = m.group(1), m.group(2), m.group(3)
        if password is not None:
            return f"{scheme}{user}:{MASK}@"
        return f"{scheme}{MASK}@" if user else m.group(0)

    out = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, _URL_USERINFO.sub(userinfo, text))
    for value in secret_env_values(env):
        out = out.replace(value, MASK)
    return out


def strip_tracking_credentials(uri: str | None) -> str | None:
    """``scheme://user:password@host/...`` -> ``scheme://host/...``, the user and password moved to
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (``scheme://token@host``: the token
    to ``MLFLOW_TRACKING_TOKEN``) for this process and the processes it starts. Credentials already
    in those variables are kept. A URI without credentials is returned as it is."""
    if not uri or "@" not in uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    user = unquote(parts.username or "")
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    elif user:
        os.environ.setdefault("MLFLOW_TRACKING_TOKEN", user)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
