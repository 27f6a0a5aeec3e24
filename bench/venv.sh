# Sourced by the bench scripts: `venv NAME REQUIREMENTS` prints the python of a virtual
# environment with REQUIREMENTS installed, made once and cached in
# ${XDG_CACHE_HOME:-~/.cache}/transferd/bench-venvs/NAME (remade when the file changes).
venv() {
    local dir="${XDG_CACHE_HOME:-$HOME/.cache}/transferd/bench-venvs/$1"
    if ! cmp -s "$2" "$dir/requirements.txt" 2>/dev/null; then
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q -r "$2" >&2
        cp "$2" "$dir/requirements.txt"
    fi
    echo "$dir/bin/python"
}
