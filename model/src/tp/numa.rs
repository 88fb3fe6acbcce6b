//! Each rank's thread runs on the CPUs of its GPU's NUMA node, so the pinned host memory its
//! ShadowKV cache allocates for the offloaded values (placed on the node of the thread that
//! allocates it) is the memory nearest to that GPU. Where the machine does not say (no NUMA,
//! no sysfs), the thread stays where it was.
use shadowkv::cudarc::driver::sys::CUdevice_attribute;
use shadowkv::Gpu;

/// The NUMA node of `gpu`'s PCI device, as sysfs gives it (`None`: unknown or no NUMA).
pub fn gpu_numa_node(gpu: &Gpu) -> Option<usize> {
    let context = gpu.context();
    let attribute = |a| context.attribute(a).ok();
    let domain = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?;
    let bus = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?;
    let device = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?;
    let path = format!("/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{device:02x}.0/numa_node");
    let node: i64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    usize::try_from(node).ok()
}

/// The CPUs of NUMA node `node` (sysfs `cpulist`, e.g. `0-15,32-47`).
pub fn node_cpus(node: usize) -> Option<Vec<usize>> {
    let list = std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist"));
    parse_cpu_list(list.ok()?.trim())
}

/// Parses a kernel CPU list (`0-3,8,10-11`).
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                cpus.extend(first.trim().parse::<usize>().ok()?..=last.trim().parse().ok()?)
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Moves the calling thread onto the CPUs of `gpu`'s NUMA node; returns the node, or `None`
/// when it is unknown or the move failed (the thread then stays where it was).
pub fn run_near(gpu: &Gpu) -> Option<usize> {
    let node = gpu_numa_node(gpu)?;
    let cpus = node_cpus(node)?;
    // SAFETY: `set` is a plain bit set owned here; sched_setaffinity(0, ...) only changes the
    // calling thread's CPU mask and reads `size_of::<cpu_set_t>()` bytes of `set`.
    let applied = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    (applied == 0).then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("a-3"), None);
    }
}
