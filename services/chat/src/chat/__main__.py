"""`python -m chat`: uvicorn with the ping settings of `Settings`."""

from __future__ import annotations

import uvicorn

from chat.config import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run(
        "chat.main:create_app",
        factory=True,
        host="0.0.0.0",  # inside a container: every interface
        port=8000,
        proxy_headers=True,
        forwarded_allow_ips="*",
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
    )


if __name__ == "__main__":
    main()
