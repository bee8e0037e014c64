#!/bin/sh
# haul: the setup of {{ name }} ({{ address }}) for {{ purpose }} by the backup server at
# {{ from }} (its address as {{ name }} sees it; `haul-pbs ssh-setup --from ADDR` to change it).
#
# Install haul-agent as {{ agent }} and haul-wrapper as {{ wrapper }} on {{ name }}
# first (the haul package does), then run this there as root:
#   haul-pbs ssh-setup {{ name }} > setup-{{ name }}.sh   # here; read it
#   scp setup-{{ name }}.sh root@{{ address }}: && ssh root@{{ address }} sh setup-{{ name }}.sh
# Running it again changes nothing that is already right.
set -eu
user={{ q_user }}
{% if dedicated %}
# 1. A dedicated system user. Its password is "*" (no password can log in, and the
#    account is not "locked", which sshd would refuse); its shell lets sshd run the
#    forced command, which is all it may run.
getent passwd "$user" >/dev/null || useradd --system --user-group --create-home --home-dir {{ q_home }} --shell /bin/sh "$user"
# Only an account that never had a password ("!", as useradd leaves it) gets "*": a
# password someone set is left alone.
if [ "$(getent shadow "$user" | cut -d: -f2)" = '!' ]; then usermod -p '*' "$user"; fi

# 2. The agent {{ agent_power }}: only root and the group
#    of "$user" may run it, so that no other local user gets that power.
caps={{ caps }}
{% if !clone %}# An agent also set up for standby copies (a clone) keeps the powers they need.
if getcap {{ q_agent }} 2>/dev/null | grep -q cap_chown; then caps={{ clone_caps }}; fi
{% endif %}chown root:"$user" {{ q_agent }}
chmod 0750 {{ q_agent }}
# Installed by the package: dpkg keeps that owner and mode across upgrades, and the
# package's postinst gives the capabilities in /etc/haul/agent.caps again.
if command -v dpkg-statoverride >/dev/null 2>&1 && dpkg -S {{ q_agent }} >/dev/null 2>&1; then
    dpkg-statoverride --remove {{ q_agent }} >/dev/null 2>&1 || true
    dpkg-statoverride --update --add root "$user" 0750 {{ q_agent }}
    install -d -m 0755 /etc/haul
    echo "$caps" > /etc/haul/agent.caps
fi
setcap "$caps" {{ q_agent }}
chown root:root {{ q_wrapper }}
chmod 0755 {{ q_wrapper }}
{% else %}
# 1. As root: the host's [[host]] (or [[clone]]) has user = "root". A dedicated user
#    (user = "haul" there, then this command again) confines what the key can do to
#    what one account can reach.
# 2. Only root may run the agent.
chown root:root {{ q_agent }}
chmod 0700 {{ q_agent }}
{% endif %}
# 3. The wrapper's policy: all the backup server may ask for.
install -d -m 0755 {{ q_policy_dir }}
cat > {{ q_policy }} <<'HAUL_EOF'
agent = {{ agent_toml }}
socket_dir = {{ socket_dir_toml }}
{{ policy }}
HAUL_EOF
chmod 0644 {{ q_policy }}
{{ q_wrapper }} --policy {{ q_policy }} --check

# 4. The directory of the runs' sockets, on tmpfs (/run): tmpfiles.d makes it again at
#    each boot. Sockets left by runs that ended are removed by the wrapper.
install -d -m 0755 {{ q_tmpfiles_dir }}
cat > {{ q_tmpfiles }} <<'HAUL_EOF'
d {{ socket_dir }} 0700 {{ user }} {{ group }} -
HAUL_EOF
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create {{ q_tmpfiles }}
else
    install -d -m 0700 -o "$user" -g {{ q_group }} {{ q_socket_dir }}
fi

# 5. The backup server's key: from its address only, and only through the wrapper.
home=$(getent passwd "$user" | cut -d: -f6)
install -d -m 0700 -o "$user" -g {{ q_group }} "$home/.ssh"
keys="$home/.ssh/authorized_keys"
touch "$keys"
# The key's earlier line, if any, gives way to this one.
grep -vF {{ q_key_material }} "$keys" > "$keys.new" || true
cat >> "$keys.new" <<'HAUL_EOF'
{{ key_line }}
HAUL_EOF
chown "$user":{{ q_group }} "$keys.new"
chmod 0600 "$keys.new"
mv "$keys.new" "$keys"

{% if dedicated %}# 6. What sshd lets this user do. Debian's sshd_config reads sshd_config.d/*.conf
#    before its own settings; a Match block in such a file ends with the file.
install -d -m 0755 {{ q_sshd_dir }}
cat > {{ q_sshd }} <<'HAUL_EOF'
Match User {{ user }}
    AllowTcpForwarding remote
    PermitListen none
    PermitOpen none
    AllowStreamLocalForwarding remote
    StreamLocalBindUnlink yes
    StreamLocalBindMask 0177
    X11Forwarding no
    AllowAgentForwarding no
    PermitTTY no
    ClientAliveInterval 30
    ClientAliveCountMax 3
HAUL_EOF
{% else %}# 6. sshd: no Match block for root (it would bind every root login); the key's own
#    options (restrict,port-forwarding and the forced command) confine this key, and
#    sshd's global settings must allow remote stream-local forwarding
#    (AllowStreamLocalForwarding yes or remote; AllowTcpForwarding not "no"), and
#    StreamLocalBindUnlink yes with StreamLocalBindMask 0177 are recommended.
{% endif %}echo "haul: {{ name }} is set up; now check and reload sshd: sshd -t && systemctl reload ssh"

# 7. Then, on the backup server, pin {{ name }}'s host key in {{ known_hosts }}:
#    ssh-keyscan -p {{ port }} {{ address }} >> {{ known_hosts }}   (and compare the fingerprint)
