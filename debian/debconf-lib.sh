# shellcheck shell=sh
# Shared by koprogo's debconf config script and its postinst (sourced, never run):
# the checks of the answers, and reading and writing /etc/koprogo/debconf.toml,
# the file the answers go to (layered under /etc/koprogo/koprogo.toml by koprogo).
#
# The file's first line is "# koprogo-debconf sha256:HEX", HEX the SHA-256 of the
# lines after it: a file whose hash still matches was written by the package and
# not edited since. Values are written as TOML basic strings, escaped here (quote,
# backslash, every control character).

# A DNS name, lowercase: labels of letters, digits and inner hyphens, dots between.
kp_valid_domain() {
    case $1 in *'
'*) return 1 ;; esac
    [ -n "$1" ] && [ ${#1} -le 253 ] &&
        printf '%s\n' "$1" | grep -Eqx '([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
}

# One address local@domain, as koprogo accepts it (no spaces, no <>,;" characters,
# one @, the domain not starting or ending with a dot).
kp_valid_email() {
    case $1 in *'
'*) return 1 ;; esac
    printf '%s\n' "$1" |
        grep -Eqx '[^@[:space:][:cntrl:]<>,;"]+@[^@.[:space:][:cntrl:]<>,;"]([^@[:space:][:cntrl:]<>,;"]*[^@.[:space:][:cntrl:]<>,;"])?'
}

# A TCP port, 1-65535, without leading zeros (TOML refuses them).
kp_valid_port() {
    case $1 in '' | 0* | *[!0-9]*) return 1 ;; esac
    [ ${#1} -le 5 ] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

# A mail server: a host name or an IP address (letters, digits, . : -).
kp_valid_host() {
    case $1 in *'
'*) return 1 ;; esac
    [ ${#1} -le 253 ] && printf '%s\n' "$1" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9.:-]*'
}

# No control character (a user name, a password: written escaped, but a newline
# cannot go through debconf anyway).
kp_no_control() {
    ! printf '%s' "$1" | LC_ALL=C grep -q '[[:cntrl:]]'
}

# kp_toml_quote STRING: STRING as a TOML basic string, quotes included.
kp_toml_quote() {
    KP_S=$1 LC_ALL=C awk 'BEGIN {
        s = ENVIRON["KP_S"]; out = "\""
        for (i = 1; i < 256; i++) ord[sprintf("%c", i)] = i
        n = length(s)
        for (i = 1; i <= n; i++) {
            c = substr(s, i, 1); o = ord[c]
            if (c == "\\") out = out "\\\\"
            else if (c == "\"") out = out "\\\""
            else if (o == 8) out = out "\\b"
            else if (o == 9) out = out "\\t"
            else if (o == 10) out = out "\\n"
            else if (o == 12) out = out "\\f"
            else if (o == 13) out = out "\\r"
            else if (o < 32 || o == 127) out = out sprintf("\\u%04X", o)
            else out = out c
        }
        print out "\""
    }'
}

# kp_toml_get FILE SECTION KEY [raw]: the value of KEY in [SECTION] ("" = the top
# level) of FILE. Only what the package writes and a plain edit of it is read:
# basic or literal strings on one line, true/false, integers. With "raw", a
# string is printed as written (quotes and escapes included). Non-zero when the
# key is absent or written another way (the caller then leaves it alone).
kp_toml_get() {
    [ -r "$1" ] || return 1
    LC_ALL=C awk -v want_sec="$2" -v want_key="$3" -v raw="${4:-}" '
        function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
        function rest_ok(s) { s = trim(s); return s == "" || substr(s, 1, 1) == "#" }
        BEGIN { sec = ""; found = 0; bad = 0 }
        /^[ \t]*\[/ {
            line = $0; sub(/#.*/, "", line); line = trim(line)
            if (line ~ /^\[[^\[\]]+\]$/) { sec = substr(line, 2, length(line) - 2); gsub(/[ \t]/, "", sec) }
            else sec = "\001"
            next
        }
        sec == want_sec {
            line = $0
            if (!match(line, /^[ \t]*[A-Za-z0-9_-]+[ \t]*=/)) next
            k = substr(line, 1, RLENGTH - 1); k = trim(k)
            if (k != want_key) next
            v = trim(substr(line, RLENGTH + 1))
            q = substr(v, 1, 1)
            if (q == "\047") {
                e = index(substr(v, 2), "\047")
                if (e == 0 || substr(v, 2, 2) == "\047\047" || !rest_ok(substr(v, e + 2))) { bad = 1; exit }
                val = substr(v, 2, e - 1)
                tok = substr(v, 1, e + 1)
            } else if (q == "\"") {
                if (substr(v, 1, 3) == "\"\"\"") { bad = 1; exit }
                val = ""; i = 2; n = length(v); closed = 0
                while (i <= n) {
                    c = substr(v, i, 1)
                    if (c == "\"") { closed = i; break }
                    if (c == "\\") {
                        d = substr(v, i + 1, 1)
                        if (d == "\\") val = val "\\"
                        else if (d == "\"") val = val "\""
                        else if (d == "t") val = val "\t"
                        else if (raw == "") { bad = 1; exit }
                        i += 2; continue
                    }
                    val = val c; i++
                }
                if (!closed || !rest_ok(substr(v, closed + 1))) { bad = 1; exit }
                tok = substr(v, 1, closed)
            } else {
                sub(/[ \t]*#.*$/, "", v)
                if (v !~ /^(true|false|[0-9]+)$/) { bad = 1; exit }
                val = v; tok = v
            }
            found = 1; exit
        }
        END {
            if (bad || !found) exit 1
            if (raw != "") print tok; else print val
        }' "$1"
}

# kp_managed_is_ours FILE: FILE is as the package wrote it (its hash line matches).
kp_managed_is_ours() {
    [ -f "$1" ] || return 1
    want=$(head -n 1 "$1" | sed -n 's/^# koprogo-debconf sha256:\([0-9a-f]\{64\}\)$/\1/p')
    [ -n "$want" ] && [ "$(tail -n +2 "$1" | sha256sum | cut -d' ' -f1)" = "$want" ]
}

# kp_managed_seal BODY OUT: writes the hash line then BODY (a file) into OUT.
kp_managed_seal() {
    { printf '# koprogo-debconf sha256:%s\n' "$(sha256sum < "$1" | cut -d' ' -f1)"; cat "$1"; } > "$2"
}
