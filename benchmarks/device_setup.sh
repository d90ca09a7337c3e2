# Sourced by benchmarks/device_check.sh and benchmarks/device_study.sh: what a bare GPU machine without network needs.
#   PYTHON   the interpreter (default python3: on the GPU machines, the one that holds torch)
#   WHEELS   a folder of wheels to install first with pip --no-index --no-deps (jsonargparse, docstring-parser,
#            typeshed-client, litdata, boto3, botocore, s3transfer, jmespath, simplejpeg: benchmarks/README.md)
# device_install installs those wheels, then this project (pip --no-deps --no-build-isolation -e .) when it is not
# importable yet, and checks that what the advmim command imports is there. It prints one line saying what it did.
# device_smoke NAME [ARG] sets SMOKE to (--smoke) or () from the script's one optional argument, or stops with a line.
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

device_smoke() {
  SMOKE=()
  case "${2:-}" in
    "") ;;
    --smoke) SMOKE=(--smoke) ;;
    *) echo "$1: unknown argument '$2'; the one option is --smoke (toy sizes on a CPU)"; exit 2 ;;
  esac
}

device_install() {
  local said=()
  if [[ -n "${WHEELS:-}" ]]; then
    if [[ ! -d "$WHEELS" ]]; then
      echo "WHEELS=$WHEELS is not a folder: give the folder that holds the .whl files"
      return 2
    fi
    local wheels=("$WHEELS"/*.whl)
    if [[ -e "${wheels[0]}" ]]; then
      "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "${wheels[@]}" || return 1
      said+=("${#wheels[@]} wheels")
    fi
  fi
  if ! "$PY" -c "import advmim_pl" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    said+=("advmim_pl (editable)")
  fi
  # what the advmim command imports and the machines lack (found without importing: no start-up cost)
  "$PY" - <<'PYEOF' || return 1
import importlib.util
import sys

needed = ("advmim_pl", "jsonargparse", "docstring_parser", "typeshed_client", "litdata", "boto3", "simplejpeg",
          "lightning", "timm", "tensorboard")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing: {', '.join(missing)}: carry their wheels in WHEELS (benchmarks/README.md lists them)")
PYEOF
  echo "installed: ${said[*]:-nothing, all present}"
}
