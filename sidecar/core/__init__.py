"""Pure decisions: no aiohttp, redis or asyncio imports here, so every rule is testable alone."""
