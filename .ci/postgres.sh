# Start a throw-away PostgreSQL server on 127.0.0.1 and export WIDEDEEP_TEST_POSTGRES_URL.
# Sourced by .ci/run; installs Debian's postgresql package if the server binaries are missing.

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

start_postgres() {
  local bin
  bin=$(pg_bin)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "installing postgresql (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(pg_bin)
  fi
  PG_DIR=$(mktemp -d /tmp/widedeep-pg.XXXXXX)
  PG_PORT=${WIDEDEEP_PG_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  local user=postgres
  id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home "$user"
  chown "$user" "$PG_DIR"
  local as_user=(runuser -u "$user" --)
  [ "$(id -u)" = 0 ] || as_user=()
  "${as_user[@]}" "$bin/initdb" -D "$PG_DIR/data" -U widedeep --auth=trust -E UTF8 >/dev/null
  "${as_user[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w -t 60 \
    -o "-h 127.0.0.1 -p $PG_PORT -k $PG_DIR -c max_connections=200" start >/dev/null
  "${as_user[@]}" "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U widedeep widedeep
  export WIDEDEEP_TEST_POSTGRES_URL="postgresql://widedeep@127.0.0.1:$PG_PORT/widedeep"
  PG_AS_USER=("${as_user[@]}")
  PG_BIN=$bin
  echo "PostgreSQL for tests: $WIDEDEEP_TEST_POSTGRES_URL"
}

stop_postgres() {
  "${PG_AS_USER[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
