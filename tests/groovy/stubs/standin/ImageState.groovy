package standin

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.objects.PathObject

/**
 * Test support, not QuPath: the "current image" of the stand-in QP class.
 *
 * Loaded from the JSON file named by the system property {@code qupath.standin.state} (or the
 * environment variable {@code QUPATH_STANDIN_STATE}):
 * <pre>
 * {"uris": ["file:/data/a.svs"] (null: no image open), "objects": [GeoJSON Features],
 *  "selected": [ids], "gui": false (true: QuPathGUI.getInstance() is not null),
 *  "record": "/path/record.json"}
 * </pre>
 * After every change (objects added or removed, a dialog shown) the record file is rewritten:
 * {@code {"added": [ids], "removed": [ids], "dialogs": [{kind, title, message}],
 * "objects": [every object of the image as a Feature]}}.
 */
class ImageState {
    private static ImageState current

    final List<String> uris
    final List<PathObject> objects = []
    final Set<String> selectedIds = new LinkedHashSet<String>()
    final boolean gui
    final File record
    final List<String> added = []
    final List<String> removed = []
    final List<Map> dialogs = []
    Map overlay = null
    private ImageData<Object> imageData

    private ImageState(Map state) {
        uris = state.uris == null ? null : ((List) state.uris).collect { it.toString() }
        ((List) (state.objects ?: [])).each { objects << GeoJson.fromFeature((Map) it) }
        ((List) (state.selected ?: [])).each { selectedIds << it.toString() }
        gui = state.gui == true
        record = state.record ? new File(state.record.toString()) : null
    }

    static synchronized ImageState get() {
        if (current == null) {
            String path = System.getProperty('qupath.standin.state') ?: System.getenv('QUPATH_STANDIN_STATE')
            if (!path)
                throw new IllegalStateException('QuPath stand-in: set -Dqupath.standin.state=STATE.json')
            current = new ImageState((Map) GeoJson.normalise(new JsonSlurper().parse(new File(path))))
        }
        return current
    }

    ImageServer<Object> server() {
        if (uris == null)
            return null
        List<URI> list = uris.collect { new URI(it) }
        return new ImageServer<Object>() {
            Collection<URI> getURIs() { return Collections.unmodifiableList(list) }
            String getPath() { return 'StandInServer: ' + list.join(', ') }
        }
    }

    synchronized ImageData<Object> imageData() {
        if (uris == null)
            return null
        if (imageData == null)
            imageData = new ImageData<Object>()
        return imageData
    }

    synchronized void overlay(Map shown) {
        overlay = shown
        save()
    }

    List<PathObject> selected() { return objects.findAll { selectedIds.contains(it.getID().toString()) } }

    synchronized void add(Collection<? extends PathObject> pathObjects) {
        pathObjects.each { PathObject p -> if (!objects.contains(p)) { objects << p; added << p.getID().toString() } }
        save()
    }

    synchronized void remove(Collection<? extends PathObject> pathObjects) {
        List<PathObject> gone = new ArrayList<PathObject>(pathObjects)
        gone.each { PathObject p -> if (objects.remove(p)) { removed << p.getID().toString(); selectedIds.remove(p.getID().toString()) } }
        save()
    }

    synchronized void dialog(String kind, String title, String message) {
        dialogs << [kind: kind, title: title, message: message]
        save()
    }

    synchronized void save() {
        if (record == null)
            return
        Map out = [added: added, removed: removed, dialogs: dialogs, objects: objects.collect { GeoJson.toFeature(it) },
                   overlay: overlay]
        File tmp = new File(record.getPath() + '.tmp')
        tmp.setText(JsonOutput.toJson(out), 'UTF-8')
        record.delete()
        tmp.renameTo(record)
    }
}
