//! A student's starting weights: random from a config, or a subset of the teacher's own layers
//! (same width, embeddings, final norm and head copied), the usual first move with a real
//! teacher (DistilBERT keeps every other layer; Minitron prunes depth the same way).

use std::str::FromStr;

use crate::model::{Llama, LlamaConfig};
use crate::train::error::{Result, TrainError as Error};

/// How the student starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StudentInit {
    /// Random weights for the `--config` architecture.
    #[default]
    Random,
    /// The teacher's layers `0, every, 2*every, ...`.
    TeacherEvery(usize),
    /// The teacher's layers at these indices, in this order.
    TeacherLayers(Vec<usize>),
}

impl FromStr for StudentInit {
    type Err = String;

    /// `random`, `teacher-layers` (every second layer), `teacher-layers:every=N` or
    /// `teacher-layers:I,J,...`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "{s:?}: expected random, teacher-layers, teacher-layers:every=N (N >= 1) or \
                 teacher-layers:I,J,... (layer indices)"
            )
        };
        match s {
            "random" => return Ok(StudentInit::Random),
            "teacher-layers" => return Ok(StudentInit::TeacherEvery(2)),
            _ => {}
        }
        let rest = s.strip_prefix("teacher-layers:").ok_or_else(bad)?;
        if let Some(n) = rest.strip_prefix("every=") {
            return match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(StudentInit::TeacherEvery(n)),
                _ => Err(bad()),
            };
        }
        let layers = rest
            .split(',')
            .map(|x| x.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad())?;
        Ok(StudentInit::TeacherLayers(layers))
    }
}

impl StudentInit {
    /// The teacher layers kept, for a teacher of `num_layers` layers (`None` for random).
    pub fn layers(&self, num_layers: usize) -> Result<Option<Vec<usize>>> {
        let invalid = |reason: &'static str| Error::InvalidOption {
            name: "student-init",
            value: format!("{self:?}"),
            reason,
        };
        match self {
            StudentInit::Random => Ok(None),
            StudentInit::TeacherEvery(n) => Ok(Some((0..num_layers).step_by(*n).collect())),
            StudentInit::TeacherLayers(l) => {
                if l.is_empty() {
                    return Err(invalid("names no layer"));
                }
                if l.iter().any(|&i| i >= num_layers) {
                    return Err(invalid("names a layer the teacher does not have"));
                }
                Ok(Some(l.clone()))
            }
        }
    }
}

/// A student made of the teacher's layers `layers` (in that order): the teacher's config with
/// `num_hidden_layers = layers.len()`, and its parameters with student layer `i` copied from
/// teacher layer `layers[i]`; embeddings, final norm and head copied whole.
pub fn student_from_teacher(
    teacher: &Llama,
    params: &[f32],
    layers: &[usize],
) -> Result<(LlamaConfig, Vec<f32>)> {
    let tcfg = teacher.config();
    if layers.is_empty() || layers.iter().any(|&l| l >= tcfg.num_hidden_layers) {
        return Err(Error::InvalidOption {
            name: "student-init",
            value: format!("{layers:?}"),
            reason: "layers must be a non-empty list of the teacher's layer indices",
        });
    }
    let cfg = LlamaConfig {
        num_hidden_layers: layers.len(),
        ..tcfg.clone()
    };
    let student = Llama::new(cfg.clone())?;
    let mut out =
        crate::train::memory::filled(student.num_params(), 0.0f32, "the student's parameters")?;
    let tl = teacher.layout();
    for t in student.layout().tensors() {
        let src_name = match t.name.strip_prefix("model.layers.") {
            None => t.name.clone(),
            Some(rest) => {
                let (i, tail) = rest
                    .split_once('.')
                    .expect("layer tensors are named model.layers.I.X");
                let i: usize = i.parse().expect("a layer index");
                format!("model.layers.{}.{tail}", layers[i])
            }
        };
        let src = tl
            .get(&src_name)
            .expect("the student's tensors are a subset of the teacher's");
        t.span.of_mut(&mut out).copy_from_slice(src.span.of(params));
    }
    Ok((cfg, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_picks_layers() {
        assert_eq!("random".parse(), Ok(StudentInit::Random));
        assert_eq!("teacher-layers".parse(), Ok(StudentInit::TeacherEvery(2)));
        assert_eq!(
            "teacher-layers:every=3".parse(),
            Ok(StudentInit::TeacherEvery(3))
        );
        assert_eq!(
            "teacher-layers:0,5,29".parse(),
            Ok(StudentInit::TeacherLayers(vec![0, 5, 29]))
        );
        for bad in [
            "teacher-layers:every=0",
            "teacher-layers:",
            "layers",
            "teacher-layers:a",
        ] {
            assert!(bad.parse::<StudentInit>().is_err(), "{bad}");
        }
        let every3 = StudentInit::TeacherEvery(3).layers(10).unwrap();
        assert_eq!(every3, Some(vec![0, 3, 6, 9]));
        assert!(StudentInit::TeacherLayers(vec![10]).layers(10).is_err());
    }

    #[test]
    fn student_layers_are_the_teachers() {
        let cfg = LlamaConfig {
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 4,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 32,
            tie_word_embeddings: false,
            ..LlamaConfig::default()
        };
        let teacher = Llama::new(cfg).unwrap();
        let p = teacher.init_params::<f32>(3);
        let (scfg, sp) = student_from_teacher(&teacher, &p, &[3, 1]).unwrap();
        assert_eq!(scfg.num_hidden_layers, 2);
        let student = Llama::new(scfg).unwrap();
        let (sl, tl) = (student.layout(), teacher.layout());
        assert_eq!(sl.embed_tokens.of(&sp), tl.embed_tokens.of(&p));
        assert_eq!(sl.lm_head.of(&sp), tl.lm_head.of(&p));
        assert_eq!(sl.norm.of(&sp), tl.norm.of(&p));
        assert_eq!(sl.layers[0].q_proj.of(&sp), tl.layers[3].q_proj.of(&p));
        assert_eq!(
            sl.layers[1].down_proj.of(&sp),
            tl.layers[1].down_proj.of(&p)
        );
        assert_ne!(sl.layers[0].q_proj.of(&sp), tl.layers[0].q_proj.of(&p));
    }
}
