# Sourced by the bench scripts: `venv NAME REQUIREMENTS` prints the python of a virtual
# environment with REQUIREMENTS installed, made once and cached in
# ${XDG_CACHE_HOME:-~/.cache}/transferd/bench-venvs/NAME (remade when the file changes).
# The requirements are copied in only once the install has succeeded, so a failed install
# (it runs inside `$(...)`, where `set -e` does not reach) is retried next time, not reused.
venv() {
    local dir="${XDG_CACHE_HOME:-$HOME/.cache}/transferd/bench-venvs/$1"
    if ! cmp -s "$2" "$dir/requirements.txt" 2>/dev/null; then
        rm -rf "$dir"
        if ! { python3 -m venv "$dir" && "$dir/bin/pip" install -q -r "$2" >&2; }; then
            rm -rf "$dir"
            echo "installing $2 into $dir failed" >&2
            return 1
        fi
        cp "$2" "$dir/requirements.txt"
    fi
    echo "$dir/bin/python"
}
