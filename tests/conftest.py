"""Every test runs under procshare's own leak check (see procshare.testing)."""

import signal

pytest_plugins = ["procshare.testing"]

# A suite started in the background (`nohup make test &`, some CI runners)
# inherits SIGINT ignored, and so would every interpreter it starts: the
# Ctrl-C tests would then wait for a KeyboardInterrupt that never comes.
# Catching it here makes the interpreters the tests start get the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
