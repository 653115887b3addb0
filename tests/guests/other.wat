;; A component of another world (see wit/other/world.wit).
(module
  (func (export "run")))
