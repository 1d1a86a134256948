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
