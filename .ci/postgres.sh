# Source this (bash, as root or as a user that can run PostgreSQL's initdb) to get a throw-away
# PostgreSQL server for the tests:
#
#   source .ci/postgres.sh && make test
#
# It installs PostgreSQL (the Debian package) when missing, starts a private cluster in a temporary
# folder that listens on 127.0.0.1 only (a free port, password authentication), creates a user and a
# database, exports CIFAR_EXP_TEST_POSTGRES_URL and stops the server again when the shell exits.
# Running it twice starts a second, independent cluster; nothing outside the temporary folder changes.

cifar_exp_start_postgres() {
    local pg_bin
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1) || true
    if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
        echo "postgres.sh: installing PostgreSQL (apt-get install postgresql)" >&2
        export DEBIAN_FRONTEND=noninteractive
        # No Debian "main" cluster on port 5432: the only server is the private one below.
        mkdir -p /etc/postgresql-common
        [ -e /etc/postgresql-common/createcluster.conf ] \
            || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
        apt-get update -qq >/dev/null || return 1
        apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
            postgresql >/dev/null || return 1
        pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi

    local dir port password run_as=()
    dir=$(mktemp -d /tmp/cifar-exp-postgres.XXXXXX)
    password="cifar-exp-$RANDOM$RANDOM"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    printf '%s\n' "$password" > "$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
        chown -R postgres "$dir"
        run_as=(runuser -u postgres --)
    fi
    "${run_as[@]}" "$pg_bin/initdb" -D "$dir/data" -U cifar_exp --pwfile="$dir/pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    "${run_as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=100" start >/dev/null \
        || { cat "$dir/server.log" >&2; return 1; }
    "${run_as[@]}" "$pg_bin/createdb" -h "$dir" -p "$port" -U cifar_exp cifar_exp_test \
        || { cat "$dir/server.log" >&2; return 1; }

    CIFAR_EXP_PG_STOP="${run_as[*]} $pg_bin/pg_ctl -D $dir/data -m fast -w stop"
    trap 'eval "$CIFAR_EXP_PG_STOP" >/dev/null 2>&1; rm -rf "'"$dir"'"' EXIT
    export CIFAR_EXP_TEST_POSTGRES_URL="postgresql://cifar_exp:$password@127.0.0.1:$port/cifar_exp_test"
    echo "postgres.sh: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" \
        "(CIFAR_EXP_TEST_POSTGRES_URL exported)" >&2
}

cifar_exp_start_postgres
