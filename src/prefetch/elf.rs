//! The shared libraries an ELF executable or library names (`DT_NEEDED`), read from its
//! program headers, dynamic section and dynamic string table; pure, no I/O.
//!
//! Why: the dynamic loader opens a program's libraries one after another, and on a cold lazy
//! layer each open waits a round trip for the library's first page. Knowing the names as soon
//! as the program's dynamic section is readable lets them all be fetched at once. Parsing is
//! done in steps, because the parts lie far apart in a big file (the dynamic section near the
//! end of the data segment, the string table near the start): [`dynamic_section`] from the
//! file's first bytes, [`string_table`] from the dynamic section, [`needed`] from both. Only
//! 64-bit little-endian objects are understood; anything else yields nothing.

use std::ops::Range;

/// `\x7fELF`.
const MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
/// Program headers looked at, whatever the header claims: real objects have about a dozen.
const MAX_PROGRAM_HEADERS: usize = 64;

/// What the first bytes of an ELF file say about its dynamic section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dynamic {
    /// File offsets of the dynamic section.
    pub range: Range<u64>,
    /// The loadable segments: (virtual address, file offset, size in the file), to turn the
    /// string table's address into a file offset.
    loads: Vec<(u64, u64, u64)>,
}

/// Whether `head` (a file's first bytes) starts like an ELF object.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The dynamic section of the object whose first bytes are `head`, if `head` holds its
/// program headers and it has one (a static program has none). At most `max_len` bytes of
/// it are asked for.
pub fn dynamic_section(head: &[u8], max_len: u64) -> Option<Dynamic> {
    if !is_elf(head) || head.get(4) != Some(&ELFCLASS64) || head.get(5) != Some(&ELFDATA2LSB) {
        return None;
    }
    let phoff = usize::try_from(u64_at(head, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(head, 0x36)?);
    let phnum = usize::from(u16_at(head, 0x38)?).min(MAX_PROGRAM_HEADERS);
    if phentsize < 0x38 {
        return None;
    }
    let mut dynamic = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let kind = u32_at(head, at)?;
        let offset = u64_at(head, at + 0x08)?;
        let vaddr = u64_at(head, at + 0x10)?;
        let filesz = u64_at(head, at + 0x20)?;
        match kind {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some(offset..offset.checked_add(filesz.min(max_len))?),
            _ => {}
        }
    }
    Some(Dynamic {
        range: dynamic?,
        loads,
    })
}

/// Tags and values of the dynamic section's entries, up to `DT_NULL`.
fn entries(section: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    section
        .chunks_exact(16)
        .map(|e| {
            (
                u64_at(e, 0).unwrap_or(DT_NULL),
                u64_at(e, 8).unwrap_or_default(),
            )
        })
        .take_while(|(tag, _)| *tag != DT_NULL)
}

/// File offsets of the dynamic string table, given the dynamic section's bytes; at most
/// `max_len` bytes of it.
pub fn string_table(dynamic: &Dynamic, section: &[u8], max_len: u64) -> Option<Range<u64>> {
    let mut address = None;
    let mut size = None;
    for (tag, value) in entries(section) {
        match tag {
            DT_STRTAB => address = Some(value),
            DT_STRSZ => size = Some(value),
            _ => {}
        }
    }
    let (address, size) = (address?, size?);
    let &(vaddr, offset, _) = dynamic
        .loads
        .iter()
        .find(|(vaddr, _, filesz)| address >= *vaddr && address - vaddr < *filesz)?;
    let start = offset.checked_add(address - vaddr)?;
    Some(start..start.checked_add(size.min(max_len))?)
}

/// The names of the libraries the dynamic section names (`DT_NEEDED`), in its order, given
/// the string table's bytes; at most `max` of them. Names that are paths or not UTF-8 are
/// skipped: the loader takes a path as it is, and those are rare.
pub fn needed(section: &[u8], strings: &[u8], max: usize) -> Vec<String> {
    entries(section)
        .filter(|(tag, _)| *tag == DT_NEEDED)
        .filter_map(|(_, at)| {
            let rest = strings.get(usize::try_from(at).ok()?..)?;
            let end = rest.iter().position(|b| *b == 0)?;
            let name = std::str::from_utf8(&rest[..end]).ok()?;
            (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
        })
        .take(max)
        .collect()
}

/// A minimal ELF64 object: header, two program headers (one load segment mapping the whole
/// file at 0x400000, one dynamic), a string table and a dynamic section naming `libs`.
#[cfg(test)]
pub(crate) fn test_object(libs: &[&str]) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let phoff = 64u64;
    let strtab_at = phoff + 2 * 56;
    let mut strings = vec![0u8];
    let mut offsets = Vec::new();
    for lib in libs {
        offsets.push(strings.len() as u64);
        strings.extend_from_slice(lib.as_bytes());
        strings.push(0);
    }
    let dynamic_at = strtab_at + strings.len() as u64;
    let mut dynamic = Vec::new();
    let mut entry = |tag: u64, value: u64| {
        dynamic.extend_from_slice(&tag.to_le_bytes());
        dynamic.extend_from_slice(&value.to_le_bytes());
    };
    for o in &offsets {
        entry(DT_NEEDED, *o);
    }
    entry(DT_STRTAB, BASE + strtab_at);
    entry(DT_STRSZ, strings.len() as u64);
    entry(DT_NULL, 0);
    let total = dynamic_at + dynamic.len() as u64;
    let mut out = vec![0u8; 64];
    out[..4].copy_from_slice(MAGIC);
    out[4] = ELFCLASS64;
    out[5] = ELFDATA2LSB;
    out[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
    out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    out[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
    let mut header = |kind: u32, offset: u64, vaddr: u64, size: u64| {
        let mut h = vec![0u8; 56];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[0x08..0x10].copy_from_slice(&offset.to_le_bytes());
        h[0x10..0x18].copy_from_slice(&vaddr.to_le_bytes());
        h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&h);
    };
    header(PT_LOAD, 0, BASE, total);
    header(
        PT_DYNAMIC,
        dynamic_at,
        BASE + dynamic_at,
        dynamic.len() as u64,
    );
    out.extend_from_slice(&strings);
    out.extend_from_slice(&dynamic);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(libs: &[&str]) -> Vec<u8> {
        test_object(libs)
    }

    fn slice(file: &[u8], r: &Range<u64>) -> Vec<u8> {
        file[r.start as usize..r.end as usize].to_vec()
    }

    #[test]
    fn finds_the_needed_libraries_step_by_step() {
        let file = object(&["libm.so.6", "libc.so.6"]);
        let dynamic = dynamic_section(&file, 1 << 16).expect("dynamic section");
        let section = slice(&file, &dynamic.range);
        let strings = string_table(&dynamic, &section, 1 << 16).expect("string table");
        let names = needed(&section, &slice(&file, &strings), 8);
        assert_eq!(names, ["libm.so.6", "libc.so.6"]);
        assert_eq!(needed(&section, &slice(&file, &strings), 1), ["libm.so.6"]);
    }

    #[test]
    fn anything_else_yields_nothing() {
        assert!(dynamic_section(b"#!/bin/sh\necho hi\n", 1 << 16).is_none());
        let file = object(&["libc.so.6"]);
        assert!(
            dynamic_section(&file[..80], 1 << 16).is_none(),
            "headers cut off"
        );
        let mut big_endian = file.clone();
        big_endian[5] = 2;
        assert!(dynamic_section(&big_endian, 1 << 16).is_none());
        let dynamic = dynamic_section(&file, 1 << 16).expect("dynamic section");
        let section = slice(&file, &dynamic.range);
        let strings = string_table(&dynamic, &section, 1 << 16).expect("string table");
        assert!(
            needed(&section, &slice(&file, &strings)[..3], 8).is_empty(),
            "a name past the string table's bytes is skipped"
        );
    }
}
