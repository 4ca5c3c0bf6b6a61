# shellcheck shell=bash
# Sourced by packaging/test-package.sh: `repo`, the signed APT repository of issue 14
# (packaging/repo-key.sh, packaging/build-repo.sh, debian/52koprogo-unattended-upgrades,
# offline-bundle.sh --from-repo). Uses its helpers (new_root, predownload, boot, ...).
#
# On the host: a throw-away repository key (no passphrase) and a second, foreign
# one; the repository made from the "prev" package; beside it, made before the
# boot, the variants apt must refuse, all offering "cur" (a newer version, so an
# accepted one would change koprogo's candidate):
#   other      the same packages, signed with the foreign key
#   badpkg     a Packages index changed by one byte (same size), Release untouched
#   badrel     that index with InRelease and Release rewritten to its hashes
#              (signatures kept)
#   badrel-detached  the same without InRelease (apt checks Release.gpg)
# and a key change apt must accept: rotate1 (our key, keyring with the next key too,
# build-repo.sh --also-trust), rotate2 (the next key alone).
# They live in $W/repo-www/<variant>, bind-mounted read-only into a fresh booted
# Debian 12 root (--private-network: loopback only), where packaging/tests/repo.sh
# serves one at a time with python3 -m http.server on 127.0.0.1:$REPO_PORT, as a
# user would: keyring and koprogo.sources fetched from the repository,
# apt-get update && apt-get install koprogo, the site over HTTPS (the local CA),
# the refusals, then (through the boot hook) "cur" published into the served
# repository with build-repo.sh and installed by Debian's unattended-upgrade, only
# thanks to the package's 52koprogo-unattended-upgrades, while a client counts
# refused connections (none allowed). Last, offline-bundle.sh --from-repo (the signed chain
# checked; a changed pool file and a foreign keyring refused) and the bundled .deb
# compared with the repository's.
#   REPO_REQUIRE_ZERO_REFUSED=0  only print the refused connections during the
#                                unattended upgrade (default 1: none may be refused;
#                                the listening sockets are kept in systemd's fd store
#                                across the restart)
#   REPO_PORT                    the HTTP port inside the container (default 18080)

REPO_PORT=${REPO_PORT:-18080}

# repo_hashes FILE: "LEN HASH" for md5, sha1, sha256 and sha512 (LEN = hex digits),
# then "size SIZE".
repo_hashes() {
  local f=$1
  echo "32 $(md5sum < "$f" | cut -d' ' -f1)"
  echo "40 $(sha1sum < "$f" | cut -d' ' -f1)"
  echo "64 $(sha256sum < "$f" | cut -d' ' -f1)"
  echo "128 $(sha512sum < "$f" | cut -d' ' -f1)"
  echo "size $(stat -c %s "$f")"
}

# repo_retarget FILE DIST: rewrites the main/binary-amd64/Packages* lines of a
# Release or InRelease FILE to the hashes and sizes of the files now in DIST (what
# an attacker who changed the index would do; the signature is left as it was).
repo_retarget() {
  local file=$1 dist=$2 f map=$W/repo-www.map
  : > "$map"
  for f in Packages Packages.gz Packages.xz; do
    repo_hashes "$dist/main/binary-amd64/$f" | sed "s#^#main/binary-amd64/$f #" >> "$map"
  done
  awk -v map="$map" '
    BEGIN { while ((getline l < map) > 0) { split(l, a, " "); v[a[1] " " a[2]] = a[3] } }
    $0 ~ /^ [0-9a-f]+ +[0-9]+ main\/binary-amd64\/Packages(\.gz|\.xz)?$/ && (($3 " " length($1)) in v) {
      printf " %s %16d %s\n", v[$3 " " length($1)], v[$3 " size"], $3; next }
    { print }' "$file" > "$file.new"
  mv "$file.new" "$file"
  rm -f "$map"
}

# repo_tamper_packages DIST: changes one hex digit of the first package's SHA256 in
# Packages (same size: the index now points at another .deb), and rebuilds .gz and
# .xz from it.
repo_tamper_packages() {
  local bin=$1/main/binary-amd64
  awk '!done && /^SHA256: / { c = substr($0, 9, 1); $0 = "SHA256: " (c == "a" ? "b" : "a") substr($0, 10); done = 1 } { print }' \
    "$bin/Packages" > "$bin/Packages.new"
  mv "$bin/Packages.new" "$bin/Packages"
  gzip -9nc "$bin/Packages" > "$bin/Packages.gz"
  xz -9c "$bin/Packages" > "$bin/Packages.xz"
}

# repo_variants: the repositories apt must refuse, from $W/repo-www/next (good + cur).
repo_variants() {
  local www=$W/repo-www d bin f h
  # other: the same packages, another key.
  packaging/build-repo.sh --repo "$www/other" --gnupghome "$W/repo-otherkey" \
    --url "http://127.0.0.1:$REPO_PORT/" "$(deb_of prev)" "$(deb_of cur)" >/dev/null 2>> "$W/repo-build.log" || return 1
  # badpkg: the index changed, Release untouched (its by-hash copies too, which is
  # what apt fetches).
  d=$www/badpkg/dists/stable bin=$d/main/binary-amd64
  cp -a "$www/next" "$www/badpkg"
  for f in Packages Packages.gz Packages.xz; do
    cp "$bin/$f" "$W/repo-www.$f.orig"
  done
  repo_tamper_packages "$d"
  for f in Packages Packages.gz Packages.xz; do
    h=$(sha256sum < "$W/repo-www.$f.orig" | cut -d' ' -f1)
    cp "$bin/$f" "$bin/by-hash/SHA256/$h"
    rm -f "$W/repo-www.$f.orig"
  done
  cmp -s "$www/next/dists/stable/InRelease" "$d/InRelease" || return 1
  # badrel: the changed index, Release and InRelease rewritten to match it.
  cp -a "$www/badpkg" "$www/badrel"
  d=$www/badrel/dists/stable bin=$d/main/binary-amd64
  for f in Packages Packages.gz Packages.xz; do
    cp "$bin/$f" "$bin/by-hash/SHA256/$(sha256sum < "$bin/$f" | cut -d' ' -f1)"
  done
  repo_retarget "$d/InRelease" "$d"
  repo_retarget "$d/Release" "$d"
  ! cmp -s "$www/next/dists/stable/InRelease" "$d/InRelease" || return 1
  # badrel-detached: no InRelease, so apt checks Release against Release.gpg.
  cp -a "$www/badrel" "$www/badrel-detached"
  rm "$www/badrel-detached/dists/stable/InRelease"
  # A key change: rotate1 is the good repository signed again with our key, its
  # keyring also holding the next key (--also-trust); rotate2 is then signed with
  # the next key alone (no --allow-key-change needed: rotate1 published it).
  cp -a "$www/good" "$www/rotate1"
  packaging/build-repo.sh --repo "$www/rotate1" --gnupghome "$W/repo-key" --resign \
    --also-trust "$W/repo-nextkey/koprogo-archive-keyring.asc" >/dev/null 2>> "$W/repo-build.log" || return 1
  cp -a "$www/rotate1" "$www/rotate2"
  packaging/build-repo.sh --repo "$www/rotate2" --gnupghome "$W/repo-nextkey" --resign >/dev/null 2>> "$W/repo-build.log" || return 1
  # Without rotate1's step, the repository refuses the next key.
  cp -a "$www/good" "$www/rotate-refused"
  if packaging/build-repo.sh --repo "$www/rotate-refused" --gnupghome "$W/repo-nextkey" --resign >/dev/null 2>> "$W/repo-build.log"; then
    kp_log "repo: FAIL: build-repo.sh signed with a key the published keyring does not hold"; return 1
  fi
  rm -rf "$www/rotate-refused"
}

# The boot hook: "cur" published into the repository being served.
# shellcheck disable=SC2317 # called through HOOK
repo_publish() {
  local t
  t=$(now)
  packaging/build-repo.sh --repo "$W/repo-www/good" --gnupghome "$W/repo-key" "$(deb_of cur)" \
    > /dev/null 2>> "$W/repo-build.log" || { kp_log "repo: build-repo.sh (publish cur) failed"; tail -n 20 "$W/repo-build.log" >&2; return 1; }
  timing "repo: build-repo.sh publishes cur into the served repository" "$(since "$t")"
}

# The bundle checks: offline-bundle.sh --from-repo refuses a changed pool file and a
# foreign keyring, and bundles exactly the repository's .deb.
repo_bundle() {
  local www=$W/repo-www t bundle want got out rc=0
  # A changed pool file (one byte, same size): refused before anything is built.
  cp -a "$www/next" "$www/badpool"
  local pooldeb
  # (the highest version, which --from-repo takes by default)
  pooldeb=$www/badpool/pool/main/k/koprogo/$(basename "$(deb_of cur)")
  [[ -f $pooldeb ]] || { kp_log "repo: FAIL: $pooldeb is not in the repository"; return 1; }
  printf 'X' | dd of="$pooldeb" bs=1 seek=200 conv=notrunc status=none
  if out=$(packaging/offline-bundle.sh --from-repo "$www/badpool" --keyring "$W/repo-key/koprogo-archive-keyring.pgp" \
             --out "$W/repo-bundle" 2>&1); then
    kp_log "repo: FAIL: offline-bundle.sh --from-repo took a changed pool file"; rc=1
  elif [[ $out != *"the package was changed"* ]]; then
    kp_log "repo: FAIL: offline-bundle.sh --from-repo (changed pool file) said: $out"; rc=1
  else
    kp_log "repo: offline-bundle.sh --from-repo refuses a changed pool file: ${out##*: }"
  fi
  if out=$(packaging/offline-bundle.sh --from-repo "$www/good" --keyring "$W/repo-otherkey/koprogo-archive-keyring.pgp" \
             --out "$W/repo-bundle" 2>&1); then
    kp_log "repo: FAIL: offline-bundle.sh --from-repo took a repository signed with another key"; rc=1
  elif [[ $out != *"signature does not verify"* ]]; then
    kp_log "repo: FAIL: offline-bundle.sh --from-repo (foreign keyring) said: $out"; rc=1
  else
    kp_log "repo: offline-bundle.sh --from-repo refuses a foreign keyring"
  fi
  [[ -z $(ls -A "$W/repo-bundle" 2>/dev/null) ]] || { kp_log "repo: FAIL: a refused bundle left files in $W/repo-bundle"; rc=1; }
  t=$(now)
  if ! bundle=$(packaging/offline-bundle.sh --from-repo "$www/good" --keyring "$W/repo-key/koprogo-archive-keyring.pgp" \
                  --out "$W/repo-bundle" 2> "$W/repo-bundle.log" | tail -n 1) || [[ ! -f $bundle ]]; then
    tail -n 20 "$W/repo-bundle.log" >&2
    kp_log "repo: FAIL: offline-bundle.sh --from-repo"; return 1
  fi
  timing "repo: offline-bundle.sh --from-repo" "$(since "$t")"
  want=$(awk -v v="$(dpkg-deb -f "$(deb_of cur)" Version)" 'BEGIN { RS = ""; FS = "\n" }
    $0 ~ "\nVersion: " v "\n" { for (i = 1; i <= NF; i++) if ($i ~ /^SHA256: /) print substr($i, 9) }' \
    "$www/good/dists/stable/main/binary-amd64/Packages")
  got=$(tar -xOf "$bundle" --wildcards '*/debs/koprogo_*.deb' | sha256sum | cut -d' ' -f1)
  if [[ -n $want && $got == "$want" ]]; then
    kp_log "repo: the bundle holds the repository's koprogo $(dpkg-deb -f "$(deb_of cur)" Version) (sha256 $got)"
  else
    kp_log "repo: FAIL: the bundle's koprogo .deb ($got) is not the repository's ($want)"; rc=1
  fi
  return $rc
}

cmd_repo() {
  ensure_built || return 1
  local root=$W/repo www=$W/repo-www rc=0 t fpr other_fpr next_fpr
  rm -rf "$www" "$W/repo-key" "$W/repo-otherkey" "$W/repo-nextkey" "$W/repo-bundle" "$W/repo-build.log"
  mkdir -p "$www"
  t=$(now)
  if ! fpr=$(packaging/repo-key.sh new "$W/repo-key" --no-passphrase --expire 1d 2>> "$W/repo-build.log" | tail -n 1) ||
     ! other_fpr=$(packaging/repo-key.sh new "$W/repo-otherkey" --no-passphrase --expire 1d --uid "Someone else <other@example.org>" 2>> "$W/repo-build.log" | tail -n 1) ||
     ! next_fpr=$(packaging/repo-key.sh new "$W/repo-nextkey" --no-passphrase --expire 1d --uid "KoproGo APT repository, next key <repository@koprogo.example>" 2>> "$W/repo-build.log" | tail -n 1); then
    tail -n 20 "$W/repo-build.log" >&2; FAILED+=("repo: repo-key.sh new"); repo_cleanup; return 1
  fi
  timing "repo: repo-key.sh new (x3, Ed25519)" "$(since "$t")"
  t=$(now)
  if ! packaging/build-repo.sh --repo "$www/good" --gnupghome "$W/repo-key" --url "http://127.0.0.1:$REPO_PORT/" \
         "$(deb_of prev)" > /dev/null 2>> "$W/repo-build.log"; then
    tail -n 20 "$W/repo-build.log" >&2; FAILED+=("repo: build-repo.sh"); repo_cleanup; return 1
  fi
  timing "repo: build-repo.sh (prev, new repository)" "$(since "$t")"
  # next: the repository after publishing cur (build-repo.sh adding to it), the base
  # of the variants.
  t=$(now)
  cp -a "$www/good" "$www/next"
  if ! packaging/build-repo.sh --repo "$www/next" --gnupghome "$W/repo-key" "$(deb_of cur)" > /dev/null 2>> "$W/repo-build.log" ||
     ! repo_variants; then
    tail -n 20 "$W/repo-build.log" >&2; FAILED+=("repo: the refused variants"); repo_cleanup; return 1
  fi
  timing "repo: variants (other key, changed Packages, changed Release, key change)" "$(since "$t")"

  new_root "$root"
  mkdir -p "$root/root/debs" "$root/srv/repo"
  # What apt will install besides koprogo, into the shared archive cache (the root
  # has only loopback); the Debian updates too, so that unattended-upgrade finds only
  # koprogo to do. The .deb is only used to ask apt for its dependencies.
  cp "$(deb_of prev)" "$root/root/debs/prev.deb"
  # (The shared archive cache is locked while another test root's apt uses it:
  # a few tries, 10 s apart.)
  local try
  for try in 1 2 3 4 5 6; do
    predownload "$root" python3 unattended-upgrades curl /root/debs/prev.deb &&
      in_root "$root" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get -qq -y --download-only upgrade >/dev/null' && break
    [[ $try -lt 6 ]] || { FAILED+=("repo: apt download"); drop_root "$root" 1; repo_cleanup; return 1; }
    kp_log "repo: apt download failed (try $try of 6; the shared cache may be locked by another test root): again in 10 s"
    sleep 10
  done
  rm -rf "$root/root/debs"
  # apt inside uses an archive directory of its own (hard links to the shared
  # cache): the shared one is locked by any other test root's apt meanwhile, and the
  # koprogo .debs fetched from the test repository stay out of it.
  mkdir -p "$root/var/cache/koprogo-test-archives/partial"
  find "$APT_ARCHIVES" -maxdepth 1 -name "*.deb" -exec cp -l -t "$root/var/cache/koprogo-test-archives/" {} + 2>/dev/null ||
    find "$APT_ARCHIVES" -maxdepth 1 -name "*.deb" -exec cp -t "$root/var/cache/koprogo-test-archives/" {} +
  ci_env "$root" PORT="$REPO_PORT" PREV_V="$(dpkg-deb -f "$(deb_of prev)" Version)" \
    CUR_V="$(dpkg-deb -f "$(deb_of cur)" Version)" KEY_FPR="$fpr" OTHER_FPR="$other_fpr" NEXT_FPR="$next_fpr" \
    KEYRING_SHA="$(sha256sum < "$W/repo-key/koprogo-archive-keyring.pgp" | cut -d' ' -f1)" \
    REQUIRE_ZERO_REFUSED="${REPO_REQUIRE_ZERO_REFUSED:-1}"
  HOOK=repo_publish boot "$root" repo 600 "$CI_SCRIPTS/repo.sh" --private-network \
    --bind-ro="$www:/srv/repo" || rc=1
  if [[ -n $(kp_procs_in "$root") ]]; then kp_log "repo: FAIL: processes left in $root (the HTTP server?)"; rc=1; fi
  drop_root "$root" $rc
  if [[ $rc -eq 0 ]]; then repo_bundle || rc=1; fi
  repo_cleanup
  [[ $rc -eq 0 ]] || FAILED+=("repo")
  return $rc
}

# Everything of the repo test in $W, and the gpg agents of its keys.
repo_cleanup() {
  local d
  for d in "$W/repo-key" "$W/repo-otherkey" "$W/repo-nextkey"; do
    [[ -d $d ]] && gpgconf --homedir "$d" --kill gpg-agent >/dev/null 2>&1
  done
  [[ $KEEP == 1 && ${rc:-0} != 0 ]] && { kp_log "kept $W/repo-* for inspection (KEEP=1)"; return 0; }
  rm -rf --one-file-system "$W/repo-www" "$W/repo-key" "$W/repo-otherkey" "$W/repo-nextkey" "$W/repo-bundle" "$W/repo-bundle.log" "$W/repo-build.log"
  return 0
}
