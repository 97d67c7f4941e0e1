# Every image of the project, built from the repository root. PACKAGE names
# the workspace member, SOURCE its folder; the target picks how it runs:
#   docker build --build-arg PACKAGE=catalog --target service .   (auth, catalog, chat)
#   docker build --build-arg PACKAGE=gateway --build-arg SOURCE=gateway --target gateway .
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
ARG PACKAGE
ARG SOURCE=services/${PACKAGE}
RUN test -n "${PACKAGE}" || { echo "set PACKAGE: auth, catalog, chat or gateway" >&2; exit 1; }
RUN --mount=type=cache,target=/root/.cache/pip python3 -m pip install "uv==0.13.9"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Every workspace member's pyproject.toml, so uv can read the workspace; then
# the third-party dependencies alone, a layer that outlives code changes.
COPY pyproject.toml uv.lock ./
COPY libs/kit/pyproject.toml libs/kit/
COPY libs/kit-testing/pyproject.toml libs/kit-testing/
COPY services/auth/pyproject.toml services/auth/
COPY services/catalog/pyproject.toml services/catalog/
COPY services/chat/pyproject.toml services/chat/
COPY gateway/pyproject.toml gateway/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package ${PACKAGE}
COPY libs/kit libs/kit
COPY ${SOURCE} ${SOURCE}
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package ${PACKAGE}

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app app
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
EXPOSE 8000

# auth, catalog, chat: their migrations beside them (the migrate step runs
# `alembic upgrade head` in this image). They sit behind the gateway, whose
# X-Forwarded-For they take for the caller's address.
FROM runtime AS service
ARG PACKAGE
ARG SOURCE=services/${PACKAGE}
COPY ${SOURCE}/alembic.ini /app/alembic.ini
COPY ${SOURCE}/migrations /app/migrations
ENV PACKAGE=${PACKAGE}
USER app
# uvicorn[standard]: httptools and uvloop; SIGTERM drains in-flight requests
# and closes WebSockets with 1012 before the process exits. uvicorn reads its
# other options from UVICORN_<OPTION> variables (chat's compose service sets
# UVICORN_LOG_LEVEL=warning: uvicorn's three INFO lines per WebSocket would
# flood a reconnect storm; the services' own logs follow LOG_LEVEL). WebSockets
# are served by kit.websocket:WebSocketProtocol, uvicorn's own keeping 12-13 KB
# less per open socket. `exec`: uvicorn replaces the shell (which only names the
# package), so it gets the signals.
CMD ["sh", "-c", "exec uvicorn \"${PACKAGE}.main:create_app\" --factory --host 0.0.0.0 --port 8000 --proxy-headers --forwarded-allow-ips '*' --timeout-graceful-shutdown 10 --ws kit.websocket:WebSocketProtocol"]

# `python -m gateway`: uvicorn[standard] (httptools, uvloop) with one worker
# process per core (WORKERS, 0 = one per usable core, capped by the CPU
# quota), each a complete gateway, and `gateway.edge:EdgeHttpProtocol`:
# httptools with the edge's guards (head deadline, body idle timeout, head
# size, connections per address, counted per worker). It raises its open-file
# limit to the hard limit first (two descriptors per relayed WebSocket).
# SIGTERM drains in-flight requests and closes WebSockets with 1012 before the
# workers exit. The gateway is the edge: it does not take X-Forwarded-* from
# clients (they could pick their own address and dodge the per-address rate
# limit); set TRUST_FORWARDED_HEADERS only behind a proxy of your own. Other
# uvicorn options: UVICORN_<OPTION> in the environment.
FROM runtime AS gateway
USER app
CMD ["python", "-m", "gateway"]
