#!/bin/sh
# Make the keys base/kustomization.yaml's secretGenerator reads, in base/keys/ (git-ignored).
# Keeps what is already there. Without the project installed here, use the image:
#   KEYGEN="docker run --rm -u $(id -u) -v $PWD/deploy/kubernetes/base/keys:/keys -w / ffai:dev \
#           ffai-worker keygen" deploy/kubernetes/make-keys.sh
set -eu
cd "$(dirname "$0")/base"
KEYGEN=${KEYGEN:-ffai-worker keygen}
mkdir -p keys
umask 077
for name in worker probe gateway; do
    if [ ! -e "keys/$name.key_secret" ]; then
        $KEYGEN --dir keys --name "$name" >/dev/null
    fi
done
if [ ! -e keys/api-key ]; then
    # 32 random bytes, base64 without newline: the gateway's Bearer token.
    head -c 32 /dev/urandom | base64 | tr -d '\n=' > keys/api-key
fi
ls keys
