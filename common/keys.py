"""ZeroMQ CURVE key files for a multi-host run (``launch/keys.py`` is the command).

Contract
--------
``write_keys(out, actors=1)`` writes, into the folder ``out``::

    learner.key, learner.key_secret          the learner's (server's) key pair
    actor.key, actor.key_secret              the actors' key pair, shared by every actor
                                             (actors > 1: actor-0.key ... actor-{N-1}.key,
                                             e.g. one per actor machine)
    evaluator.key, evaluator.key_secret      the held-out evaluator's key pair (a transport
                                             client too, when started on its own)
    clients/<name>.key                       every client's PUBLIC key: the learner's
                                             ``transport.curve_public_keys_dir``

in ``zmq.auth`` certificate format (``zmq.auth.load_certificate`` reads them), plus a
``.gitignore`` that keeps the folder out of git (if none is there). Secret files are mode
0600 from the moment they exist (written in a private temporary folder, then renamed into
place), public files 0644. Nothing is overwritten: if any of these files
exists, ``KeysExistError`` is raised and nothing is written, unless ``force``; with
``force`` every pair is replaced and ``clients/`` loses every other ``*.key``, so keys
of an earlier generation stop being accepted.

Which side reads what (``KeySet.*_overrides`` spell it as dotted config overrides):
- learner: ``transport.curve_secret_key=<out>/learner.key_secret``,
  ``transport.curve_public_keys_dir=<out>/clients``;
- an actor: ``transport.curve_client_secret_key=<out>/actor.key_secret``,
  ``transport.curve_server_public_key=<out>/learner.key``;
- the evaluator started on its own: ``curve_client_secret_key=<out>/evaluator.key_secret``.
A one-machine run (``launch/run.py``) gives the learner's and the actor's fields in one
config; the evaluator it starts reads the same config and uses the actor's key.
Paths are printed as ``out`` was given: a relative ``out`` stays relative to the working
directory of the processes (the repo root for every command in the README).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq.auth

__all__ = ["KeySet", "KeysExistError", "write_keys", "key_layout", "CLIENTS_DIR"]

CLIENTS_DIR = "clients"


class KeysExistError(FileExistsError):
    """Key files are already there and ``force`` was not given."""


@dataclass
class KeySet:
    """Where one ``write_keys`` put its files (paths as ``out`` was given)."""

    out: Path
    learner: tuple[Path, Path]                 # (public, secret)
    actors: list[tuple[Path, Path]]            # one pair, or one per actor machine
    evaluator: tuple[Path, Path]
    clients_dir: Path
    client_publics: list[Path] = field(default_factory=list)

    def learner_overrides(self) -> list[str]:
        return [f"transport.curve_secret_key={self.learner[1]}",
                f"transport.curve_public_keys_dir={self.clients_dir}"]

    def actor_overrides(self, i: int = 0) -> list[str]:
        return [f"transport.curve_client_secret_key={self.actors[i][1]}",
                f"transport.curve_server_public_key={self.learner[0]}"]

    def evaluator_overrides(self) -> list[str]:
        return [f"transport.curve_client_secret_key={self.evaluator[1]}",
                f"transport.curve_server_public_key={self.learner[0]}"]


def _pair(out: Path, name: str) -> tuple[Path, Path]:
    return out / f"{name}.key", out / f"{name}.key_secret"


def key_layout(out: str | Path, actors: int = 1) -> KeySet:
    """The files ``write_keys(out, actors)`` writes, without writing anything."""
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    out = Path(out)
    actor_names = ["actor"] if actors == 1 else [f"actor-{i}" for i in range(actors)]
    clients = out / CLIENTS_DIR
    return KeySet(out=out, learner=_pair(out, "learner"), actors=[_pair(out, n) for n in actor_names],
                  evaluator=_pair(out, "evaluator"), clients_dir=clients,
                  client_publics=[clients / f"{n}.key" for n in actor_names + ["evaluator"]])


def write_keys(out: str | Path, actors: int = 1, force: bool = False) -> KeySet:
    """Write the learner's, the actors' and the evaluator's CURVE key pairs into ``out``
    (see the module docstring for the layout). Raises ``KeysExistError`` naming the files
    already there unless ``force``."""
    ks = key_layout(out, actors)
    out = ks.out
    pairs = [ks.learner, *ks.actors, ks.evaluator]
    targets = [p for pair in pairs for p in pair] + ks.client_publics
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        names = ", ".join(str(p.relative_to(out)) for p in existing)
        raise KeysExistError(
            f"refusing to overwrite {len(existing)} existing key file(s) in {out}/ ({names}); "
            "use --force to replace every key (actors and the learner then need the new ones)")
    out.mkdir(parents=True, exist_ok=True)
    ks.clients_dir.mkdir(exist_ok=True)
    ignore = out / ".gitignore"
    if not ignore.exists():  # secret keys never end up in a commit of the checkout
        ignore.write_text("# written by launch/keys.py: CURVE keys are not for version control\n*\n")
    tmp = Path(tempfile.mkdtemp(prefix=".keys-", dir=out))  # mode 0700: secrets never readable by others
    try:
        for public, secret in pairs:
            name = public.stem
            pub_tmp, sec_tmp = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
            os.chmod(sec_tmp, 0o600)
            os.chmod(pub_tmp, 0o644)
            if public.stem != "learner":
                client_tmp = tmp / f"{name}.client"
                shutil.copyfile(pub_tmp, client_tmp)
                os.chmod(client_tmp, 0o644)
            os.replace(sec_tmp, secret)
            os.replace(pub_tmp, public)
        if force:  # a key of an earlier generation must stop being accepted
            for old in ks.clients_dir.glob("*.key"):
                old.unlink()
        for pub in ks.client_publics:
            os.replace(tmp / f"{pub.stem}.client", pub)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ks
