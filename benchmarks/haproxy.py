"""deploy/haproxy.cfg, the HAProxy configuration shipped for aeserve replicas, rendered for other ports and servers.

The system test (tests/system/test_replicas.py) and benchmarks/replicas.py run what ``haproxy_config`` returns: the
shipped file's global and defaults sections as they are (timeouts, retries, redispatch, retry-on, http-buffer-request),
and its frontend, backend and stats sections with their addresses and servers replaced. The standard library only, so
that tests import it without the benchmarks' packages.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"


def sections(text: str) -> dict[str, str]:
    """A configuration's sections by header line ('global', 'frontend aeserve', ...), each up to the next header;
    a comment block right above a header belongs to that header's section."""
    lines = text.splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if line.strip() and not line[0].isspace() and not line.startswith("#")]
    starts = []
    for i in headers:
        while i > 0 and lines[i - 1].startswith("#"):
            i -= 1
        starts.append(i)
    ends = [*starts[1:], len(lines)]
    return {lines[h].strip(): "".join(lines[start:end]).rstrip("\n") + "\n" for h, start, end in zip(headers, starts, ends, strict=True)}


def _one(found: dict[str, str], kind: str) -> str:
    texts = [text for header, text in found.items() if header.split()[0] == kind]
    if len(texts) != 1:
        raise ValueError(f"{SHIPPED}: expected one {kind} section, found {len(texts)}")
    return texts[0]


def _replace(pattern: str, line: str, text: str) -> str:
    """``text`` with the one line matching ``pattern`` replaced by ``line``; an error when not exactly one matches."""
    result, count = re.subn(pattern, lambda _: line, text, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(f"{SHIPPED}: expected one line matching {pattern!r}, found {count}")
    return result


def haproxy_config(frontends: Mapping[str, tuple[int, Sequence[int] | Mapping[str, int]]], stats_port: int | None = None,
                   backend_lines: Sequence[str] = (), path: Path = SHIPPED) -> str:
    """deploy/haproxy.cfg for replicas on 127.0.0.1.

    ``frontends``: name -> (its port, its replicas' ports, or server name -> port; a list's servers are r0, r1, ...).
    Each gives a frontend ``name`` on 127.0.0.1:port and a backend ``name_replicas``, the shipped ones with that
    address, and the backend's servers with the shipped server options (check inter ... fall ... rise ...).
    ``backend_lines`` are added to every backend; the stats listener is there, on 127.0.0.1:stats_port, when a port
    is given. Global and defaults are the shipped file's, as they are.
    """
    found = sections(path.read_text())
    frontend, backend, stats = _one(found, "frontend"), _one(found, "backend"), _one(found, "listen")
    options = re.search(r"^\s+server \S+ \S+ (.*)$", backend, re.MULTILINE).group(1)
    backend = re.sub(r"^\s+server .*\n", "", backend, flags=re.MULTILINE)
    parts = [f"# {path.name} rendered by benchmarks/haproxy.py\n", _one(found, "global"), _one(found, "defaults")]
    for name, (port, servers) in frontends.items():
        named = servers if isinstance(servers, Mapping) else {f"r{j}": p for j, p in enumerate(servers)}
        text = _replace(r"^frontend .*$", f"frontend {name}", frontend)
        text = _replace(r"^\s+bind .*$", f"    bind 127.0.0.1:{port}", text)
        parts.append(_replace(r"^\s+default_backend .*$", f"    default_backend {name}_replicas", text))
        text = _replace(r"^backend .*$", f"backend {name}_replicas", backend)
        parts.append(text + "".join(f"    {line}\n" for line in backend_lines)
                     + "".join(f"    server {server} 127.0.0.1:{p} {options}\n" for server, p in named.items()))
    if stats_port is not None:
        parts.append(_replace(r"^\s+bind .*$", f"    bind 127.0.0.1:{stats_port}", stats))
    return "\n".join(parts)
