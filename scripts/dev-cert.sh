#!/usr/bin/env bash
# A local test CA and a certificate it signs, for trying TLS (never for production):
#
#   scripts/dev-cert.sh DIR NAME [DNS-NAME...]
#
# writes DIR/ca.pem (made once, reused), DIR/NAME.pem and DIR/NAME.key (ECDSA P-256, valid for
# 30 days, for the DNS names given, default NAME). Point `tls.certificates[].cert_file/key_file`
# at NAME.pem/NAME.key, and clients (curl --cacert) or `client_auth.ca_file` at ca.pem.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR NAME [DNS-NAME...]" >&2; exit 2; }
dir=$1 name=$2
shift 2
[ $# -gt 0 ] || set -- "$name"
command -v openssl >/dev/null || { echo "needs openssl (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
if [ ! -s "$dir/ca.pem" ] || [ ! -s "$dir/ca.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=Tollgate dev CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
fi
san=$(printf 'DNS:%s,' "$@")
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 30 -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "${san%,}") \
    -out "$dir/$name.pem" 2>/dev/null
rm -f "$dir/$name.csr"
chmod 600 "$dir/$name.key" "$dir/ca.key"
echo "$dir/$name.pem $dir/$name.key (CA: $dir/ca.pem)"
