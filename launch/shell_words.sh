# shellcheck shell=bash
# Shell helpers of the launch scripts (sourced, not run).

# Prints its arguments as one shell command line (arguments with special characters in single quotes).
quoted() {
  local words=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}
