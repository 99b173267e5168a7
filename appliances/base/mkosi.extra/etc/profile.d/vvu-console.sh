# Login shells on the serial console (root, autologin): a fixed prompt and a
# banner that vvu_runtime.launch.appliance waits for, no bracketed paste.
if [ "$(tty 2>/dev/null)" = /dev/ttyS0 ]; then
    stty cols 512 2>/dev/null
    if [ -n "${BASH_VERSION:-}" ]; then
        bind 'set enable-bracketed-paste off' 2>/dev/null
    fi
    PS1='vvu# '
    echo "vvu-appliance: ready ($(hostname))"
fi
