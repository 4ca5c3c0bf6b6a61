#!/usr/bin/env bash
# The OpenPGP key that signs the KoproGo APT repository (packaging/build-repo.sh),
# kept in a GnuPG home directory of its own.
#
#   packaging/repo-key.sh new DIR [--expire 2y] [--rsa] [--uid "NAME <EMAIL>"]
#                                 (--passphrase-file FILE | --no-passphrase)
#   packaging/repo-key.sh extend DIR [--expire 2y] [--passphrase-file FILE]
#   packaging/repo-key.sh show DIR
#
#   new      creates DIR (mode 0700, it must not exist or be empty) as a GnuPG home
#            holding one signing key: Ed25519 (--rsa: RSA 4096), expiring after
#            --expire (default 2y; gpg's syntax: 1y, 18m, 2026-12-31), and writes beside it
#              DIR/koprogo-archive-keyring.pgp    the public keyring (binary), what
#                                                 users install for Signed-By
#              DIR/koprogo-archive-keyring.asc    the same, ASCII-armoured
#              DIR/revocation-<FINGERPRINT>.rev   the revocation certificate
#   extend   moves the expiry date (default 2y from now) and exports the public
#            keyring again: publish it (build-repo.sh copies it into the repository);
#            users need the new one before the old date passes
#   show     prints the fingerprint, expiry and validity
#
# The passphrase: --passphrase-file FILE (the first line of FILE; keep it apart from
# the key) for real use; --no-passphrase for tests or a key that never leaves an
# encrypted offline medium. gpg runs in batch mode and never prompts.
#
# Keeping it safe: DIR holds the secret key. Keep it offline (an encrypted USB stick,
# a machine that only signs), back it up twice (e.g. a second stick, and
# `gpg --homedir DIR --export-secret-keys --armor > key.asc` on paper or in a safe),
# and keep the revocation certificate somewhere else again: if the key is lost or
# stolen, `gpg --import revocation-<FPR>.rev` into any keyring, export it, and tell
# users to install a new keyring (see the README, "Publishing the APT repository").
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=packaging/lib.sh
. "$here/lib.sh"

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
cmd=$1; shift
case $cmd in
  -h|--help) usage; exit 0 ;;
  new|extend|show) ;;
  *) kp_die "unknown command $cmd: new | extend | show (see --help)" ;;
esac
[[ $# -ge 1 && $1 != -* ]] || kp_die "$cmd needs the key's directory (a GnuPG home), e.g. $cmd /media/offline/koprogo-repo-key"
dir=$1; shift
expire=2y algo=ed25519 uid="KoproGo APT repository <repository@koprogo.example>" pass='' nopass=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --expire) [[ $# -ge 2 ]] || kp_die "--expire needs a period (2y, 18m) or a date (2027-12-31)"; expire=$2; shift 2 ;;
    --rsa) algo=rsa4096; shift ;;
    --uid) [[ $# -ge 2 ]] || kp_die "--uid needs \"NAME <EMAIL>\""; uid=$2; shift 2 ;;
    --passphrase-file) [[ $# -ge 2 ]] || kp_die "--passphrase-file needs a file"; pass=$2; shift 2 ;;
    --no-passphrase) nopass=1; shift ;;
    *) kp_die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $expire != 0 && $expire != never ]] ||
  kp_die "--expire $expire: the key must expire (a stolen or lost key must not be valid for ever); extend it later with: $0 extend DIR"
if [[ -n $pass ]]; then
  [[ -r $pass ]] || kp_die "--passphrase-file $pass: no such readable file"
  [[ -n $(head -n 1 "$pass") ]] || kp_die "--passphrase-file $pass: its first line (the passphrase) is empty"
fi
command -v gpg >/dev/null || {
  [[ $(id -u) -eq 0 ]] || kp_die "gpg is missing: apt-get install gpg"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gpg gpg-agent >/dev/null || kp_die "cannot install gpg: apt-get install gpg gpg-agent"
}

gpgh() { gpg --homedir "$dir" --batch --quiet --no-tty "$@"; }
pass_args=()
if [[ -n $pass ]]; then pass_args=(--pinentry-mode loopback --passphrase-file "$pass"); fi
# gpg starts an agent for the secret key: stop it again when we are done.
trap 'gpgconf --homedir "$dir" --kill gpg-agent >/dev/null 2>&1 || true' EXIT

# The fingerprint of the (only) secret key in DIR.
fingerprint() {
  local fprs
  fprs=$(gpgh --with-colons --list-secret-keys 2>/dev/null | awk -F: '$1 == "sec" { s = 1; next } s && $1 == "fpr" { print $10; s = 0 }')
  [[ -n $fprs ]] || kp_die "$dir holds no secret key: create one with: $0 new $dir"
  [[ $(wc -l <<<"$fprs") -eq 1 ]] || kp_die "$dir holds several secret keys ($(tr '\n' ' ' <<<"$fprs")): keep one repository key per directory"
  echo "$fprs"
}

export_public() {
  local fpr=$1
  gpgh --export-options export-minimal --export "$fpr" > "$dir/koprogo-archive-keyring.pgp"
  gpgh --export-options export-minimal --armor --export "$fpr" > "$dir/koprogo-archive-keyring.asc"
  chmod 0644 "$dir/koprogo-archive-keyring.pgp" "$dir/koprogo-archive-keyring.asc"
}

show() {
  local fpr=$1
  gpgh --with-colons --list-keys "$fpr" | awk -F: '
    $1 == "pub" {
      v = $2; until = $7
      state = (v == "e") ? "EXPIRED" : (v == "r") ? "REVOKED" : "valid"
      printf "algorithm: %s\n", ($4 == 22) ? "Ed25519" : ($4 == 1 ? "RSA " $3 : "algo " $4 " " $3)
      printf "state: %s\n", state
      if (until != "") { cmd = "date -u -d @" until " +%Y-%m-%d"; cmd | getline d; close(cmd); printf "expires: %s\n", d }
      else printf "expires: never\n"
    }
    $1 == "fpr" && !f { printf "fingerprint: %s\n", $10; f = 1 }
    $1 == "uid" { printf "uid: %s\n", $10 }'
}

case $cmd in
  new)
    [[ -n $pass || $nopass -eq 1 ]] ||
      kp_die "choose a passphrase: --passphrase-file FILE (real use), or --no-passphrase (tests, or a key that never leaves an encrypted offline medium)"
    [[ -n $pass && $nopass -eq 1 ]] && kp_die "--passphrase-file and --no-passphrase exclude each other"
    if [[ -e $dir ]]; then
      [[ -d $dir ]] || kp_die "$dir exists and is not a directory: give a new directory for the key"
      [[ -z $(ls -A "$dir") ]] || kp_die "$dir is not empty: give a new directory (an existing key is never overwritten)"
    fi
    mkdir -p "$dir"
    chmod 0700 "$dir"
    if [[ $nopass -eq 1 ]]; then pass_args=(--pinentry-mode loopback --passphrase ''); fi
    kp_log "creating a $algo signing key in $dir (expires: $expire)"
    gpgh "${pass_args[@]}" --quick-generate-key "$uid" "$algo" sign "$expire" ||
      kp_die "gpg could not create the key in $dir (see its message above)"
    fpr=$(fingerprint)
    export_public "$fpr"
    rev="$dir/openpgp-revocs.d/$fpr.rev"
    [[ -f $rev ]] || kp_die "gpg wrote no revocation certificate ($rev): make one with gpg --homedir $dir --gen-revoke $fpr"
    # gpg's file starts with a ':' that must be removed before use: keep the
    # certificate as written, the README says how to use it.
    cp "$rev" "$dir/revocation-$fpr.rev"
    chmod 0600 "$dir/revocation-$fpr.rev"
    show "$fpr"
    cat >&2 <<EOF

The repository key is in $dir (secret key: keep it offline and backed up).
  public keyring (publish it; build-repo.sh copies it into the repository):
    $dir/koprogo-archive-keyring.pgp
  revocation certificate (store it apart from the key; to use it, remove the ':'
  before "-----BEGIN" and gpg --import it):
    $dir/revocation-$fpr.rev
Sign a repository with: packaging/build-repo.sh --gnupghome $dir ${pass:+--passphrase-file $pass }--repo DIR --url URL DEB...
EOF
    echo "$fpr"
    ;;
  extend)
    [[ -d $dir ]] || kp_die "$dir: no such directory (the key's GnuPG home)"
    fpr=$(fingerprint)
    [[ ${#pass_args[@]} -gt 0 ]] || pass_args=(--pinentry-mode loopback --passphrase '')
    gpgh "${pass_args[@]}" --quick-set-expire "$fpr" "$expire" ||
      kp_die "gpg could not change the expiry of $fpr (a passphrase-protected key needs --passphrase-file)"
    export_public "$fpr"
    show "$fpr"
    kp_log "exported $dir/koprogo-archive-keyring.pgp: publish it (build-repo.sh --resign copies it into the repository) well before the old expiry date"
    echo "$fpr"
    ;;
  show)
    [[ -d $dir ]] || kp_die "$dir: no such directory (the key's GnuPG home)"
    fpr=$(fingerprint)
    show "$fpr"
    ;;
esac
