"""``python -m tests.support.fakeupstream``: the benchmark's upstream."""

from tests.support.fakeupstream.server import main

main()
