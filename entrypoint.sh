#!/usr/bin/env bash
# The container's entrypoint (SPEC §3, §12); tini runs it as PID 1's only child.
#
#   entrypoint.sh [MODE] [options]   ->   exec python -m job MODE [options]
#
# MODE is generate | train | verify | evaluate | sample | predict | status. Without one (no arguments, or options
# first, as in `entrypoint.sh --preset smoke`) it is train. The settings the environment gives
# (JOB_*, AWS_ENDPOINT_URL, ...) are checked here first: a typo ends the container at once with
# exit 2, which SPEC §3 reserves for "not worth a restart" (the Kubernetes Job fails on it),
# instead of a traceback later or a restart loop. Then `exec` replaces this shell with Python,
# so that SIGTERM from `docker stop` or the kubelet reaches the job itself (exit 143 after a
# checkpoint).
#
# `entrypoint.sh healthcheck` is the image's HEALTHCHECK (see health_check below).
#
# PYTHON names the interpreter (default: python on PATH; the tests point it at their venv).
set -euo pipefail

PYTHON=${PYTHON:-python}
MODES=(generate train verify evaluate sample predict status)
PRESETS=(smoke small default)
LOG_LEVELS=(DEBUG INFO WARNING ERROR)
# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens; then an optional prefix.
S3_URI_RE='^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$'
SCHEME_RE='^[A-Za-z][A-Za-z0-9+.-]*://'
HTTP_URL_RE='^https?://[^/[:space:]]+([/?#][^[:space:]]*)?$'

die() {
  printf 'entrypoint.sh: error: %s\n' "$*" >&2
  exit 2
}

one_of() { # one_of VALUE CHOICE... : VALUE is one of the CHOICEs
  local value=$1 choice
  shift
  for choice in "$@"; do
    [[ $value == "$choice" ]] && return 0
  done
  return 1
}

check_run_uri() { # check_run_uri WHERE URI
  local where=$1 uri=$2
  [[ -n $uri ]] || die "$where is empty; give a local path or s3://bucket/prefix"
  if [[ $uri == s3:* ]]; then
    [[ $uri =~ $S3_URI_RE ]] ||
      die "$where=$uri is not a valid S3 URI; expected s3://bucket/prefix (bucket: 3-63 lowercase letters, digits, dots, hyphens)"
  elif [[ $uri =~ $SCHEME_RE && $uri != file:///* ]]; then
    die "$where=$uri: unsupported scheme ${uri%%://*}://; give a local path or s3://bucket/prefix"
  fi
}

check_url() { # check_url NAME : an endpoint variable, when set, is an http(s) URL
  local name=$1
  [[ -v $name ]] || return 0
  [[ ${!name} =~ $HTTP_URL_RE ]] ||
    die "$name=${!name} is not an http:// or https:// URL (e.g. http://minio:9000); unset it for AWS S3"
}

check_settings() { # check_settings ARG... : the environment, and --run-uri among the arguments
  if [[ -v JOB_RUN_URI ]]; then
    check_run_uri JOB_RUN_URI "$JOB_RUN_URI"
  fi
  if [[ -v JOB_PRESET ]] && ! one_of "$JOB_PRESET" "${PRESETS[@]}"; then
    die "JOB_PRESET=$JOB_PRESET is not a preset; choose one of: ${PRESETS[*]}"
  fi
  if [[ -v JOB_LOG_LEVEL ]] && ! one_of "${JOB_LOG_LEVEL^^}" "${LOG_LEVELS[@]}"; then
    die "JOB_LOG_LEVEL=$JOB_LOG_LEVEL is not a log level; choose one of: ${LOG_LEVELS[*]}"
  fi
  if [[ -v JOB_CACHE_DIR ]]; then
    [[ -n $JOB_CACHE_DIR ]] || die "JOB_CACHE_DIR is set but empty; give a writable directory or unset it"
    if [[ -e $JOB_CACHE_DIR && ! -d $JOB_CACHE_DIR ]]; then
      die "JOB_CACHE_DIR=$JOB_CACHE_DIR exists and is not a directory"
    fi
    if [[ -d $JOB_CACHE_DIR && ! -w $JOB_CACHE_DIR ]]; then
      die "JOB_CACHE_DIR=$JOB_CACHE_DIR is not writable by uid $(id -u); mount it writable for that user"
    fi
  fi
  check_url AWS_ENDPOINT_URL
  check_url AWS_ENDPOINT_URL_S3
  # Half a key pair is a typo, not an instance role: say so now rather than AccessDenied later.
  # (Only the names are printed, never the values.)
  if [[ -n ${AWS_ACCESS_KEY_ID:-} && -z ${AWS_SECRET_ACCESS_KEY:-} ]]; then
    die "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; set both or neither"
  fi
  if [[ -z ${AWS_ACCESS_KEY_ID:-} && -n ${AWS_SECRET_ACCESS_KEY:-} ]]; then
    die "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set both or neither"
  fi
  while (($#)); do
    case $1 in
      --run-uri=*) check_run_uri --run-uri "${1#--run-uri=}" ;;
      --run-uri)
        (($# >= 2)) || die "--run-uri needs a value"
        check_run_uri --run-uri "$2"
        shift
        ;;
    esac
    shift
  done
}

# HEALTHCHECK: healthy while the job's heartbeat is fresh (or the run has completed), judged by
# `python -m job status` on the LOCAL working copy: the cache (JOB_CACHE_DIR) of an s3:// run,
# or the run folder itself when it is local. The job writes progress.json there first, so this
# answers in about 0.1 s without an S3 request every interval, and a bucket that is briefly
# down (training goes on, SPEC §10) does not make a live job look dead. status exits 1 for a
# stale heartbeat (3 heartbeat intervals), failed, stalled or preempted, and 2 while no
# progress.json exists yet (covered by the HEALTHCHECK's start period); Docker reserves exit 2,
# so every failure is reported as 1.
health_check() {
  local uri=${JOB_RUN_URI:-runs/${JOB_PRESET:-default}} folder
  if [[ $uri =~ $SCHEME_RE && $uri != file://* ]]; then
    folder=${JOB_CACHE_DIR:-$uri} # without a cache dir setting, ask the run folder itself
  else
    folder=${uri#file://}
  fi
  if "$PYTHON" -m job status "$folder"; then
    exit 0
  fi
  exit 1
}

# Matplotlib's font list, built into the image (MPL_FONT_CACHE, see the Dockerfile), copied into
# MPLCONFIGDIR, which must be writable (/tmp, a tmpfs under a read-only root filesystem): without
# it every new container rebuilds the list and prints a non-JSON line. Best effort.
seed_font_cache() {
  [[ -n ${MPL_FONT_CACHE:-} && -n ${MPLCONFIGDIR:-} && -d $MPL_FONT_CACHE ]] || return 0
  mkdir -p "$MPLCONFIGDIR" 2>/dev/null || return 0
  local file
  for file in "$MPL_FONT_CACHE"/fontlist-*.json; do
    [[ -f $file && ! -e $MPLCONFIGDIR/${file##*/} ]] || continue
    cp "$file" "$MPLCONFIGDIR/" 2>/dev/null || true
  done
}

mode=train
if (($#)) && [[ $1 != -* ]]; then
  mode=$1
  shift
fi
if [[ $mode == healthcheck ]]; then
  health_check
fi
one_of "$mode" "${MODES[@]}" || die "unknown mode '$mode'; expected one of: ${MODES[*]} (default: train)"
check_settings "$@"
seed_font_cache
# Scaling out (SPEC §13): with JOB_NPROC_PER_NODE, train runs under torchrun, one process per
# GPU (or CPU process with gloo). Multi-node options come as torchrun's own PET_* variables
# (PET_NNODES, PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID): see infra/k8s/multinode-job.yaml.
if [[ $mode == train && -n ${JOB_NPROC_PER_NODE:-} ]]; then
  [[ $JOB_NPROC_PER_NODE =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]] ||
    die "JOB_NPROC_PER_NODE=$JOB_NPROC_PER_NODE is not a process count (a number, gpu, cpu or auto)"
  exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$JOB_NPROC_PER_NODE" -m job train "$@"
fi
exec "$PYTHON" -m job "$mode" "$@"
