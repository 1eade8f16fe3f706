#!/usr/bin/env bash
# Build kustomize from its Go module, sigs.k8s.io/kustomize/kustomize/v5, at a
# pinned version, with the local Go toolchain (no prebuilt binary download: only
# the Go module proxy is reachable here).
#
# The binary goes to a cache directory outside the repository, keyed by version:
#   ${ECR_WEBHOOK_CACHE:-$HOME/.cache/ecr-webhook}/tools/kustomize-vX.Y.Z/kustomize
# If it is already there, nothing is built (a no-op).
#
# stdout: exactly one line, the path of the kustomize binary.
# stderr: progress, go's output and the build time.
#
# Environment: GO (go binary to use), ECR_WEBHOOK_CACHE (cache root),
#              KUSTOMIZE_VERSION (override the pin; tests use the pin).
set -euo pipefail

# Pinned: the release manifests/install.yaml is rendered with.  v5.8.2's go.mod
# says `go 1.26.0`, which the Go 1.26 toolchain here satisfies with
# GOTOOLCHAIN=local; v5.8.3 needs go >= 1.27 and fails to build with it.
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.8.2}"

log() { printf '[build-kustomize] %s\n' "$*" >&2; }

cache_root="${ECR_WEBHOOK_CACHE:-$HOME/.cache/ecr-webhook}"
out="$cache_root/tools/kustomize-${KUSTOMIZE_VERSION}"
bin="$out/kustomize"

if [[ -x "$bin" ]]; then
	printf '%s\n' "$bin"
	exit 0
fi

mkdir -p "$cache_root/tools"
# Serialise concurrent builds (two test sessions, or pytest-xdist workers).
exec 9>"$cache_root/tools/.kustomize.lock"
if command -v flock >/dev/null 2>&1; then
	flock 9
	if [[ -x "$bin" ]]; then
		printf '%s\n' "$bin"
		exit 0
	fi
fi

GO="${GO:-$(command -v go || true)}"
if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; fi
if [[ -z "$GO" ]]; then
	log "no Go toolchain found: put go on PATH or set GO=/path/to/go"
	exit 1
fi
log "using $("$GO" version)"
log "building sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION} into $out"

# Build into a scratch directory and rename at the end, so an interrupted build
# never leaves a half-populated cache directory behind.
tmp="$(mktemp -d "$cache_root/tools/.kustomize-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

start=$(date +%s)
# `go install pkg@version` resolves the module's own go.mod (with its replace
# directives ignored, as for any consumer) and needs no module of ours.
# GOFLAGS is reset so a caller's -mod=vendor or similar cannot interfere.
env CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" GOBIN="$tmp" \
	"$GO" install -trimpath -ldflags "-s -w" \
	"sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
end=$(date +%s)

[[ -x "$tmp/kustomize" ]] || { log "go install produced no kustomize binary"; exit 1; }
"$tmp/kustomize" version >&2
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
chmod 755 "$out"
log "build time: $((end - start))s"
printf '%s\n' "$bin"
