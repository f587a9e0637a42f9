"""Which ranks of a group share a node (an NVLink domain), for a Buffer made without `ranks_per_node`.

DeepEP finds its nodes itself (its ranks are numbered node by node, 8 to a node), so code written for it passes no
node size. ep's C API takes `config.ranks_per_node` and numbers ranks the same way (rank r is on node
r // ranks_per_node); a Buffer without `ranks_per_node` works it out from where each rank runs."""

import socket


def host_id():
    """This process's host: its name and the kernel's boot id (containers of one machine share the boot id, and two
    machines that happen to share a name do not)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def ranks_per_node_of(fn, hosts):
    """config.ranks_per_node for ranks whose hosts are `hosts` (rank order): 0 (one node) when they share one host;
    else the ranks of each host, when every host holds the same number of consecutive ranks; else ValueError
    asking for ranks_per_node (ep's nodes are blocks of consecutive ranks of one size)."""
    size = len(hosts)
    if len(set(hosts)) == 1:
        return 0
    per_node = hosts.index(next(h for h in hosts if h != hosts[0]))  # the first host's ranks
    blocks = [hosts[i:i + per_node] for i in range(0, size, per_node)]
    if size % per_node or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        layout = ", ".join(f"rank {r}: {h.split('/')[0]}" for r, h in enumerate(hosts[:16]))
        raise ValueError(f"{fn}: the group's ranks do not form nodes of consecutive ranks of one size ({layout}"
                         f"{', ...' if size > 16 else ''}); pass ranks_per_node= (ranks r .. r + ranks_per_node - 1 "
                         "share a node) or number the ranks node by node")
    return per_node
