"""Fault injection for the crash test: hold each changelog record the worker sends for 0.12 s.

The crash test puts this folder on the worker's PYTHONPATH, and Python imports a module named
sitecustomize at startup. A record that takes longer than 0.1 s to reach aiokafka is what a
slow broker round trip or a busy CPU produces. faust-streaming 0.15.3 commits offsets once
Producer.flush() has seen no record sent for 0.1 s, so a worker that does not wait for its
changelog records itself lets a commit overtake them.
"""

import asyncio

from faust.transport.drivers import aiokafka as faust_driver

CHANGELOG_DELAY_S = 0.12

_send = faust_driver.Producer.send


async def _send_changelog_late(self, topic, *args, **kwargs):
    if topic.endswith("-changelog"):
        await asyncio.sleep(CHANGELOG_DELAY_S)
    return await _send(self, topic, *args, **kwargs)


faust_driver.Producer.send = _send_changelog_late
