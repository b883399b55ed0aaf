#!/usr/bin/env bash
# The image drill (issue 14; `make image-test`, run by .ci/run after `make test`): build the
# image for real and run it the way the README's user story does, against a local S3.
#
#   1. apt-get install docker.io debootstrap docker-compose, when missing (needs root)
#   2. start dockerd (default settings: overlay2, bridge) unless one already answers
#   3. a Debian bookworm base without any registry: debootstrap --variant=minbase from the
#      mirror apt already uses, then `docker import` (kept in the engine: a rerun reuses it)
#   4. a wheelhouse in a temporary folder: the host's pip downloads requirements.txt (torch is
#      the CPU wheel pip finds on this machine, PyPI's Linux torch is the multi-GB CUDA build)
#      and python's http.server serves it on 127.0.0.1. The build installs only from there
#      (PIP_NO_INDEX=1, PIP_FIND_LINKS): it makes no TLS connection, so a machine whose TLS goes
#      through a proxy needs no CA bundle in the build, and none can reach the image.
#   5. docker build with the classic builder (DOCKER_BUILDKIT=0), timed; again with a new
#      CREATED (every RUN and COPY layer must come from the cache), timed; a copy of the context
#      with a line added under job/ (the apt and pip layers must come from the cache), timed;
#      then with BuildKit (DOCKER_BUILDKIT=1; its own cache, so a second full build), timed
#   6. pytest tests/drills/container (with the checkout's .venv, from the repository root): the
#      containers against moto's S3 server on loopback (--network host), see test_image.py
#   7. on exit, whatever happened: remove the drill's containers, stop the wheel server and the
#      dockerd this script started (and with it its containerd), delete the temporary folder
#
# Environment: DOCKER (client; default Debian's /usr/bin/docker, which has BuildKit built in),
# DRILL_IMAGE (tag, default magvit-job:drill), DRILL_BASE_IMAGE (default
# local/debian-bookworm:minbase), DEBIAN_MIRROR (default: apt's own), DRILL_WHEEL_PORT (the
# wheelhouse's loopback port, default 18765), DRILL_SKIP_BUILDKIT=1. Extra arguments go to pytest.
# Timings are printed as lines starting with "drill:".
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DOCKER=${DOCKER:-}
IMAGE=${DRILL_IMAGE:-magvit-job:drill}
BASE_IMAGE=${DRILL_BASE_IMAGE:-local/debian-bookworm:minbase}
LABEL=magvit-drill
started_at=$EPOCHREALTIME

say() { printf 'drill: %s\n' "$*" >&2; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; } # seconds since $1

[[ -x $PYTHON ]] || { say "no $PYTHON: run 'make venv' first"; exit 1; }

workdir=$(mktemp -d /tmp/magvit-drill.XXXXXX)
dockerd_pid=
server_pid=

remove_containers() { # the drill's containers, running or not
  local ids
  mapfile -t ids < <("$DOCKER" ps -aq --filter "label=$LABEL")
  ((${#ids[@]} == 0)) || "$DOCKER" rm -f "${ids[@]}" >/dev/null
}

cleanup() {
  local rc=$?
  set +e
  if [[ -n $DOCKER ]] && "$DOCKER" info >/dev/null 2>&1; then
    remove_containers
  fi
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [[ -n $dockerd_pid ]]; then
    say "stopping the dockerd it started (pid $dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$dockerd_pid" 2>/dev/null
    wait "$dockerd_pid" 2>/dev/null
  fi
  rm -rf "$workdir"
  say "wall time $(elapsed "$started_at") s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. tools ------------------------------------------------------------------------------------
missing=()
[[ -x /usr/sbin/dockerd || -n $(command -v dockerd) ]] || missing+=(docker.io)
[[ -n $(command -v debootstrap) ]] || missing+=(debootstrap)
[[ -n $(command -v docker-compose) ]] || missing+=(docker-compose)
if ((${#missing[@]})); then
  say "apt-get install ${missing[*]}"
  t=$(now)
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  say "apt-get install took $(elapsed "$t") s"
fi
if [[ -z $DOCKER ]]; then
  # Debian's client (20.10) builds with BuildKit without buildx; a newer client on PATH may not.
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
fi

# 2. dockerd ----------------------------------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
  say "starting dockerd"
  dockerd >"$workdir/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 120); do
    "$DOCKER" info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$workdir/dockerd.log" >&2; exit 1; }
    sleep 0.5
  done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$workdir/dockerd.log" >&2; say "dockerd did not answer"; exit 1; }
fi
say "engine $("$DOCKER" version --format '{{.Server.Version}}'), client $DOCKER $("$DOCKER" version --format '{{.Client.Version}}')"
remove_containers # of an earlier, interrupted drill

# 3. base image -------------------------------------------------------------------------------
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  # shellcheck disable=SC2016 # $(...) is apt's format, not the shell's
  mirror=${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk '$2 == "bookworm" {print $1; exit}')}
  mirror=${mirror:-http://deb.debian.org/debian/}
  say "debootstrap bookworm from $mirror"
  t=$(now)
  debootstrap --variant=minbase bookworm "$workdir/rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 ||
    { tail -20 "$workdir/debootstrap.log" >&2; exit 1; }
  tar -C "$workdir/rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
  rm -rf "$workdir/rootfs"
  say "base image $BASE_IMAGE in $(elapsed "$t") s"
fi

# 4. wheelhouse on loopback -------------------------------------------------------------------
t=$(now)
"$PYTHON" -m pip download --quiet --disable-pip-version-check -r requirements.txt -d "$workdir/wheels" 2>&1 |
  grep -v "is ignored: it is neither" >&2 || true
# The build backend pip needs to install the job itself (pyproject.toml's build-system).
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps "setuptools>=68" -d "$workdir/wheels" 2>&1 |
  grep -v "is ignored: it is neither" >&2 || true
ls "$workdir"/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 ||
  say "warning: no CPU torch wheel found; the image gets PyPI's (CUDA) torch"
# A fixed port: the URL is a build arg of the pip step, so a new port would rebuild that layer.
port=${DRILL_WHEEL_PORT:-18765}
if ! "$PYTHON" -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  say "port ${DRILL_WHEEL_PORT:-18765} is taken: the wheelhouse is on $port, the pip layer will not come from the cache"
fi
"$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$workdir/wheels" >"$workdir/http.log" 2>&1 &
server_pid=$!
for _ in $(seq 50); do
  "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=2)" 2>/dev/null && break
  sleep 0.2
done
say "wheelhouse of $(find "$workdir/wheels" -name '*.whl' | wc -l) wheels on 127.0.0.1:$port in $(elapsed "$t") s"

# 5. builds -----------------------------------------------------------------------------------
build() { # build LOG BUILDKIT(0|1) TAG ARGS... : docker build of the current folder, output to LOG
  local log=$1 buildkit=$2 tag=$3
  shift 3
  DOCKER_BUILDKIT=$buildkit "$DOCKER" build --network host \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" "$@" -t "$tag" . >"$log" 2>&1 ||
    { tail -40 "$log" >&2; say "docker build failed (DOCKER_BUILDKIT=$buildkit)"; exit 1; }
}
t=$(now)
build "$workdir/build-classic.log" 0 "$IMAGE" --build-arg CREATED="$(date -u +%FT%TZ)"
cached=$(grep -c -- '---> Using cache' "$workdir/build-classic.log" || true)
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
say "classic build: $(elapsed "$t") s ($cached steps from the cache), image $size bytes ($((size / 1000000)) MB)"

sleep 1
t=$(now)
build "$workdir/build-rebuild.log" 0 "$IMAGE" --build-arg CREATED="$(date -u +%FT%TZ)"
runs=$(grep -c -- '---> Running in' "$workdir/build-rebuild.log" || true)
copies=$(grep -E -A1 '^Step [0-9]+/[0-9]+ : (RUN|COPY) ' "$workdir/build-rebuild.log" | grep -c -v -E '^(Step|--|.*Using cache)' || true)
say "classic rebuild with a new CREATED: $(elapsed "$t") s"
if ((copies)); then
  grep -E -A1 '^Step [0-9]+/[0-9]+ : (RUN|COPY) ' "$workdir/build-rebuild.log" >&2
  say "a new CREATED rebuilt a RUN or COPY layer"
  exit 1
fi
say "  every RUN and COPY step came from the cache ($runs metadata steps ran)"

# A change under job/: the apt and pip layers must come from the cache. The same files as the
# checkout's context (the .dockerignore allow-list) in a copy, with one line added to job/.
mkdir "$workdir/context"
cp -r Dockerfile .dockerignore entrypoint.sh requirements.txt pyproject.toml job "$workdir/context/"
echo "# drill: a code change" >>"$workdir/context/job/__init__.py"
t=$(now)
(cd "$workdir/context" && build "$workdir/build-code.log" 0 "$IMAGE-code" --build-arg CREATED="$(date -u +%FT%TZ)")
say "classic rebuild after a change under job/: $(elapsed "$t") s"
if grep -A1 -E '^Step [0-9]+/[0-9]+ : RUN (apt-get|python3 -m venv|pip)' "$workdir/build-code.log" | grep -q -- '---> Running in'; then
  say "a change under job/ rebuilt the apt or pip layer"
  exit 1
fi
"$DOCKER" rmi "$IMAGE-code" >/dev/null
[[ $("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.base.name"}}' "$IMAGE") == "$BASE_IMAGE" ]] ||
  { say "the base.name label is not $BASE_IMAGE"; exit 1; }

if [[ ${DRILL_SKIP_BUILDKIT:-} != 1 ]]; then
  t=$(now)
  build "$workdir/build-buildkit.log" 1 "$IMAGE" --build-arg CREATED="$(date -u +%FT%TZ)"
  say "BuildKit build: $(elapsed "$t") s"
fi

# 6. the containers ---------------------------------------------------------------------------
t=$(now)
DRILL_IMAGE=$IMAGE DRILL_DOCKER=$DOCKER DRILL_LABEL=$LABEL \
  "$PYTHON" -m pytest -q -rP -p no:cacheprovider tests/drills/container "$@"
say "container tests: $(elapsed "$t") s"
