"""The agent runtime: the aiohttp service that wraps an agent's operations with enterprise controls."""
