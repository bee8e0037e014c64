//! An in-memory backend, for tests and examples.

use super::{check_name, Backend, FileType, ObjectWriter};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Objects = Arc<Mutex<BTreeMap<(FileType, String), Vec<u8>>>>;

#[derive(Default)]
pub struct MemoryBackend {
    objects: Objects,
    /// Objects moved aside, in order.
    aside: Mutex<Vec<(FileType, String, Vec<u8>)>>,
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn list(&self, t: FileType) -> Result<Vec<(String, u64)>> {
        let objects = self.objects.lock().expect("memory backend");
        Ok(objects
            .iter()
            .filter(|((ft, _), _)| *ft == t)
            .map(|((_, n), d)| (n.clone(), d.len() as u64))
            .collect())
    }

    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        let objects = self.objects.lock().expect("memory backend");
        objects
            .get(&(t, name.to_string()))
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: format!("{t} {name}"),
            })
    }

    fn read_range(&self, t: FileType, name: &str, offset: u64, length: u32) -> Result<Vec<u8>> {
        let objects = self.objects.lock().expect("memory backend");
        let data = objects
            .get(&(t, name.to_string()))
            .ok_or_else(|| Error::NotFound {
                what: format!("{t} {name}"),
            })?;
        let end = offset
            .checked_add(length as u64)
            .filter(|&e| e <= data.len() as u64)
            .ok_or_else(|| {
                Error::corrupt(
                    format!("{t} {name}"),
                    format!("range {offset}+{length} past its end ({})", data.len()),
                )
            })?;
        Ok(data[offset as usize..end as usize].to_vec())
    }

    fn write_once(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        insert(&self.objects, t, name, data)
    }

    fn writer(&self, t: FileType) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(MemoryWriter {
            objects: self.objects.clone(),
            t,
            data: Vec::new(),
        }))
    }

    fn delete(&self, t: FileType, name: &str) -> Result<()> {
        let mut objects = self.objects.lock().expect("memory backend");
        objects
            .remove(&(t, name.to_string()))
            .map(|_| ())
            .ok_or_else(|| Error::NotFound {
                what: format!("{t} {name}"),
            })
    }

    fn move_aside(&self, t: FileType, name: &str) -> Result<String> {
        let data = self
            .objects
            .lock()
            .expect("memory backend")
            .remove(&(t, name.to_string()))
            .ok_or_else(|| Error::NotFound {
                what: format!("{t} {name}"),
            })?;
        let mut aside = self.aside.lock().expect("memory backend");
        aside.push((t, name.to_string(), data));
        Ok(format!("moved aside #{}", aside.len()))
    }
}

impl MemoryBackend {
    /// The objects moved aside so far: (type, name, bytes).
    pub fn moved_aside(&self) -> Vec<(FileType, String, Vec<u8>)> {
        self.aside.lock().expect("memory backend").clone()
    }
}

fn insert(objects: &Objects, t: FileType, name: &str, data: &[u8]) -> Result<()> {
    check_name(t, name)?;
    let mut objects = objects.lock().expect("memory backend");
    let key = (t, name.to_string());
    if objects.contains_key(&key) {
        return Err(Error::AlreadyExists {
            what: format!("{t} {name}"),
        });
    }
    objects.insert(key, data.to_vec());
    Ok(())
}

struct MemoryWriter {
    objects: Objects,
    t: FileType,
    data: Vec<u8>,
}

impl std::io::Write for MemoryWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for MemoryWriter {
    fn finish(self: Box<Self>, name: &str) -> Result<()> {
        insert(&self.objects, self.t, name, &self.data)
    }
}
