"""Write the ZeroMQ CURVE key files of a multi-host run and print the config overrides.

    python launch/keys.py [--out keys] [--actors N] [--force]

Writes the learner's key pair, the actors' (one shared pair, or N pairs with --actors N,
e.g. one per actor machine), the evaluator's, and ``<out>/clients/`` (every client's public
key: the learner's ``transport.curve_public_keys_dir``); secret files are mode 0600.
Refuses to overwrite existing keys unless --force (which replaces them all).
configs/paper-qwen2.5-math-7b.yaml names the files this writes with the default --out keys
(run from the repo root). The layout: common/keys.py.
"""

import argparse
import sys

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from common.keys import KeysExistError, write_keys  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="keys", help="folder for the key files (default: keys, relative to the "
                    "working directory, as the config paths are)")
    ap.add_argument("--actors", type=int, default=1, help="actor key pairs: 1 = one key shared by every actor "
                    "(default), N = actor-0..actor-{N-1}, e.g. one per actor machine")
    ap.add_argument("--force", action="store_true", help="replace existing keys (the learner and every actor "
                    "then need the new files)")
    args = ap.parse_args(argv)
    if args.actors < 1:
        ap.error("--actors must be >= 1")
    try:
        ks = write_keys(args.out, actors=args.actors, force=args.force)
    except KeysExistError as e:
        sys.exit(f"error: {e}")
    print(f"wrote CURVE keys into {ks.out}/ (secret files mode 0600):")
    print(f"  learner    {ks.learner[1]}  (public: {ks.learner[0]})")
    for pub, sec in ks.actors:
        print(f"  {pub.stem:<10} {sec}")
    print(f"  evaluator  {ks.evaluator[1]}")
    print(f"  clients    {ks.clients_dir}/  ({', '.join(p.stem for p in ks.client_publics)}: the keys the learner accepts)")
    print("\nlearner (launch/learner.py; launch/run.py on one machine takes both lines):")
    print("  " + " ".join(ks.learner_overrides()))
    for i, (pub, _) in enumerate(ks.actors):
        where = "" if len(ks.actors) == 1 else f" on actor machine {i}"
        print(f"actors{where} (launch/actors.py):")
        print("  " + " ".join(ks.actor_overrides(i)))
    print("the evaluator started on its own (launch/actors.py --evaluator):")
    print("  " + " ".join(ks.evaluator_overrides()))
    print(f"\nThe learner's machine needs {ks.learner[1]} and {ks.clients_dir}/; an actor's machine its "
          f".key_secret and {ks.learner[0]} (a shared file system needs no copying). Keep the .key_secret files "
          "private. Then check the config: launch/check.py --config CFG [--role learner|actor] [overrides]")


if __name__ == "__main__":
    main()
