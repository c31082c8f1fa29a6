#!/usr/bin/env bash
# Make a private CA, a TLS server certificate for the broker, and optional client certificates (openssl).
#
#   deploy/mosquitto/make-certs.sh OUT_DIR BROKER_NAME [BROKER_NAME_OR_IP ...] [--client NODE_ID ...] [--days N]
#
#   OUT_DIR/ca.crt, ca.key           the CA: ca.crt goes to the broker and every node; keep ca.key offline
#   OUT_DIR/server.crt, server.key   the broker's certificate, valid for every BROKER_NAME (DNS names or IPs)
#   OUT_DIR/NODE_ID.crt, NODE_ID.key a client certificate (CN = node id) for mutual TLS, per --client
#
# Clients connect with mqtts://BROKER_NAME:8883 and ca_file = ca.crt; the name must be one of the certificate's.
# An existing CA, server certificate or client certificate is kept, so the script can be re-run to add clients.
# Keys are EC P-256. Needs openssl 1.1.1 or later.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 2 ] || usage
out=$1
shift
names=()
clients=()
days=825
while [ $# -gt 0 ]; do
  case $1 in
    --client) [ $# -ge 2 ] || usage; clients+=("$2"); shift 2 ;;
    --days) [ $# -ge 2 ] || usage; days=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "make-certs.sh: unknown option $1" >&2; usage ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -ge 1 ] || usage
for id in "${clients[@]}"; do
  # Node ids (docs/PROTOCOL.md §1): they become file names and the certificate's CN.
  [[ $id =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$ && $id != ca && $id != server ]] ||
    { echo "make-certs.sh: bad node id '$id'" >&2; exit 2; }
done

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

san=""
for name in "${names[@]}"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done

cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = ${san%,}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# issue NAME CN PROFILE: NAME.key + NAME.crt signed by the CA
issue() {
  newkey "$out/$1.key"
  openssl req -new -config "$work/openssl.cnf" -key "$out/$1.key" -subj "/CN=$2" -out "$work/$1.csr"
  openssl x509 -req -in "$work/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "$(serial)" \
    -days "$days" -sha256 -extfile "$work/openssl.cnf" -extensions "$3" -out "$out/$1.crt" 2>/dev/null
  chmod 644 "$out/$1.crt"
  echo "made $out/$1.crt ($3: $2)"
}

if [ ! -f "$out/ca.crt" ]; then
  newkey "$out/ca.key"
  openssl req -x509 -new -config "$work/openssl.cnf" -extensions ca -key "$out/ca.key" -subj "/CN=FLoRA Edge CA" \
    -set_serial "$(serial)" -days 3650 -sha256 -out "$out/ca.crt"
  chmod 644 "$out/ca.crt"
  echo "made $out/ca.crt (keep $out/ca.key offline)"
fi
[ -f "$out/server.crt" ] || issue server "${names[0]}" server
for id in "${clients[@]}"; do
  [ -f "$out/$id.crt" ] || issue "$id" "$id" client
done
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null
