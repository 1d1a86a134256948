"""Extra verifier kinds for the pool tests: a worker that hangs forever and one that dies.
Resolved by name inside the spawned worker processes."""

import os
import time

from actors.verifiers.verdict import Verdict


def sleep_forever(response, target, timeout_s):
    while True:  # ignores its own time limit: only the pool's deadline can end it
        time.sleep(3600)


def die(response, target, timeout_s):
    os._exit(3)


def echo(response, target, timeout_s):
    return Verdict(1.0 if response == target else 0.0, "correct" if response == target else "wrong", response)


def parity(response, target, timeout_s):
    """Token-id responses ("3 17 5"): correct iff the id sum's parity is ``target`` (0/1);
    target "error" stands for a verifier that could not judge."""
    if target == "error":
        return Verdict(0.0, "error", "stand-in verifier failure")
    ok = sum(int(t) for t in response.split()) % 2 == int(target)
    return Verdict(1.0 if ok else 0.0, "correct" if ok else "wrong", response)
