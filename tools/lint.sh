#!/usr/bin/env bash
# Static validation of docker/, infra/ and configs/ without Docker or a cluster.
#   tools/lint.sh               set up .venv-lint when needed, run every validator
#   tools/lint.sh --setup-only  only set up .venv-lint
# Validators (each must pass; all run even when one fails, then a summary):
#   hadolint            every Dockerfile under docker/ (.hadolint.yaml)
#   shell scripts       docker/**/*.sh and this script, with shellcheck
#   yamllint            all YAML under docker/ infra/ configs/ (.yamllint)
#   kustomize render    infra/k8s/base (kubectl kustomize; without it, the listed files)
#   kubernetes-validate built-in kinds, --strict, against Kubernetes $K8S_VERSION
#   validate_crds       RayCluster, VirtualService, DestinationRule against ../shared/schemas/crds (strict)
#   checkov             Terraform, Kubernetes, Dockerfiles (.checkov.yaml, --skip-download)
#   terraform fmt       formatting of infra/terraform (when terraform is installed)
# The tools are pinned in tools/lint-requirements.txt and live in .venv-lint (own venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PYTHON_SET="${PYTHON:-}"
PYTHON="${PYTHON:-python3.11}"
VENV="${LINT_VENV:-.venv-lint}"
REQ="tools/lint-requirements.txt"
K8S_VERSION="${K8S_VERSION:-1.34.0}"
CRD_DIR="${CRD_DIR:-$ROOT/../shared/schemas/crds}"

say() { printf '%s\n' "lint: $*"; }
die() { printf '%s\n' "lint: $*" >&2; exit 2; }

# --- .venv-lint: (re)installed when missing or when the requirements changed -------------
stamp="$VENV/.installed-$(sha256sum "$REQ" | cut -c1-16)"
if [[ ! -f "$stamp" || ! -x "$VENV/bin/python" ]]; then
  # Without python3.11 on PATH, the project's own .venv (Python 3.11) can create the venv.
  if ! command -v "$PYTHON" >/dev/null 2>&1 && [[ -z "${PYTHON_SET:-}" && -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  fi
  command -v "$PYTHON" >/dev/null 2>&1 \
    || die "'$PYTHON' not found. Install Python 3.11 (Debian/Ubuntu: apt-get install python3.11 python3.11-venv) or pass PYTHON=/path/to/python3.11."
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "the venv module is missing for $PYTHON (Debian/Ubuntu: apt-get install python3.11-venv)."
  say "installing the lint tools into $VENV (first time: one to three minutes)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  log="$VENV/install.log"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -r "$REQ" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "could not install $REQ into $VENV (full log: $log)"
  fi
  touch "$stamp"
fi
# The venv ignores itself (as Python 3.13's venv does), so it never shows up in git status.
[[ -f "$VENV/.gitignore" ]] || printf '*\n' >"$VENV/.gitignore"
[[ "${1:-}" == "--setup-only" ]] && exit 0
B="$VENV/bin"

# --- run every step, remember failures ---------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
declare -a results=()
failed=0

run_step() {
  local name="$1"; shift
  local t0 t1 rc
  t0=$(date +%s.%N)
  say "--- $name"
  set +e
  "$@"
  rc=$?
  set -e
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [[ $rc -eq 0 ]]; then
    results+=("ok    ${secs}s  $name")
  else
    results+=("FAIL  ${secs}s  $name (exit $rc)")
    failed=1
  fi
}

mapfile -t dockerfiles < <(find docker -type f \( -name Dockerfile -o -name '*.Dockerfile' \) | sort)
mapfile -t shell_scripts < <( { find docker -type f -name '*.sh'; echo tools/lint.sh; } | sort)

step_hadolint() {
  [[ ${#dockerfiles[@]} -gt 0 ]] || { echo "no Dockerfile under docker/"; return 1; }
  "$B/hadolint" --config .hadolint.yaml "${dockerfiles[@]}" && echo "hadolint: ${#dockerfiles[@]} Dockerfile(s) clean"
}

step_shellcheck() {
  "$B/shellcheck" --severity=style "${shell_scripts[@]}" && echo "shellcheck: ${#shell_scripts[@]} script(s) clean"
}

step_yamllint() {
  "$B/yamllint" --strict -c .yamllint docker infra configs && echo "yamllint: clean"
}

# infra/k8s/base and every overlay under infra/k8s/overlays/ are rendered and validated.
mapfile -t kustomizations < <(
  echo infra/k8s/base
  find infra/k8s/overlays -mindepth 2 -maxdepth 2 -name kustomization.yaml -printf '%h\n' 2>/dev/null | sort
)

rendered_name() { echo "$tmp/$(echo "$1" | tr '/' '_').yaml"; }

step_render() {
  local k out rc=0
  for k in "${kustomizations[@]}"; do
    out="$(rendered_name "$k")"
    if "$B/python" tests/infra/render_manifests.py "$k" -o "$out"; then
      echo "rendered $k: $(grep -c '^kind:' "$out") object(s)"
    else
      rc=1
    fi
  done
  return $rc
}

step_kubernetes_validate() {
  local k out rc=0
  for k in "${kustomizations[@]}"; do
    out="$(rendered_name "$k")"
    [[ -s "$out" ]] || { echo "$k: nothing rendered"; rc=1; continue; }
    # Custom kinds only draw "no schema" warnings here; validate_crds checks those.
    if "$B/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$out"; then
      echo "kubernetes-validate: $k built-in kinds valid for Kubernetes $K8S_VERSION (strict)"
    else
      rc=1
    fi
  done
  return $rc
}

step_validate_crds() {
  local k files=()
  for k in "${kustomizations[@]}"; do
    [[ -s "$(rendered_name "$k")" ]] || { echo "$k: nothing rendered"; return 1; }
    files+=("$(rendered_name "$k")")
  done
  "$B/python" tests/infra/validate_crds.py --crd-dir "$CRD_DIR" "${files[@]}"
}

step_checkov() {
  # One run over the three folders; the JSON report is summarised (checkov repeats results
  # per folder in its own output). Exit status: checkov's, or 1 on any failed check.
  local rc=0
  "$B/checkov" --config-file .checkov.yaml -d docker -d infra/k8s -d infra/terraform \
    --framework dockerfile kubernetes terraform -o json >"$tmp/checkov.json" 2>"$tmp/checkov.err" || rc=$?
  "$B/python" tests/infra/checkov_summary.py "$tmp/checkov.json" || rc=1
  [[ $rc -eq 0 ]] || cat "$tmp/checkov.err"
  return $rc
}

step_terraform_fmt() {
  if ! command -v terraform >/dev/null 2>&1; then
    echo "terraform not installed: formatting not checked (HCL syntax is still parsed by checkov)"
    return 0
  fi
  TF_CLI_CONFIG_FILE=/dev/null terraform fmt -check -recursive -diff infra/terraform \
    && echo "terraform fmt: clean"
}

start=$(date +%s)
run_step "hadolint (${#dockerfiles[@]} Dockerfiles)" step_hadolint
run_step "shellcheck (${#shell_scripts[@]} scripts)" step_shellcheck
run_step "yamllint (docker infra configs)" step_yamllint
run_step "render infra/k8s/base" step_render
run_step "kubernetes-validate --strict (k8s $K8S_VERSION)" step_kubernetes_validate
run_step "validate_crds (RayCluster, VirtualService, DestinationRule)" step_validate_crds
run_step "checkov (terraform, kubernetes, dockerfile)" step_checkov
run_step "terraform fmt" step_terraform_fmt

say "=== summary ($(( $(date +%s) - start ))s)"
printf '  %s\n' "${results[@]}"
if [[ $failed -ne 0 ]]; then
  say "FAILED"
  exit 1
fi
say "all validators passed"
